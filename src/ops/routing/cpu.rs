//! Routing by agreement on the CPU reference backend (f64 sums).

use crate::Result;
use crate::backend::cpu::{CpuBackend, add_into};
use crate::float::Float;
use crate::par::{par_map, par_rows};

use super::{RoutingOps, RoutingSaved, check_routing, check_routing_bwd, check_routing_fwd};
use crate::ops::capsules::CapsShape;
use crate::ops::capsules::cpu::{squash_vec, squash_vec_bwd};

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn softmax(x: &[f64], out: &mut [f64]) {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut z = 0.0;
    for (o, v) in out.iter_mut().zip(x) {
        *o = (v - m).exp();
        z += *o;
    }
    out.iter_mut().for_each(|o| *o /= z);
}

impl<T: Float> RoutingOps for CpuBackend<T> {
    fn routing_fwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        uhat: &Vec<T>,
        v: &mut Vec<T>,
        saved: &mut RoutingSaved<Vec<T>>,
    ) -> Result<()> {
        const OP: &str = "routing_fwd";
        let (ni, nj, d) = (s.in_caps, s.out_caps, s.out_dim);
        check_routing(OP, s, rounds, uhat.len(), [saved.c.len(), saved.s.len(), saved.v.len()])?;
        check_routing_fwd(s, v.len())?;
        let per_image = par_map(s.batch, rounds * ni * nj * d * 2, |b| {
            let uh: Vec<f64> = uhat[b * ni * nj * d..(b + 1) * ni * nj * d]
                .iter()
                .map(|x| x.to_f64())
                .collect();
            let mut logits = vec![0.0; ni * nj];
            let (mut cs, mut ss, mut vs) = (
                vec![0.0; rounds * ni * nj],
                vec![0.0; rounds * nj * d],
                vec![0.0; rounds * nj * d],
            );
            for r in 0..rounds {
                let c = &mut cs[r * ni * nj..(r + 1) * ni * nj];
                for (cr, lr) in c.chunks_mut(nj).zip(logits.chunks(nj)) {
                    softmax(lr, cr);
                }
                let sr = &mut ss[r * nj * d..(r + 1) * nj * d];
                for i in 0..ni {
                    for j in 0..nj {
                        let cij = c[i * nj + j];
                        let u = &uh[(i * nj + j) * d..(i * nj + j + 1) * d];
                        for (o, x) in sr[j * d..(j + 1) * d].iter_mut().zip(u) {
                            *o += cij * x;
                        }
                    }
                }
                let vr = &mut vs[r * nj * d..(r + 1) * nj * d];
                for j in 0..nj {
                    squash_vec(&sr[j * d..(j + 1) * d], &mut vr[j * d..(j + 1) * d]);
                }
                if r + 1 < rounds {
                    for i in 0..ni {
                        for j in 0..nj {
                            let u = &uh[(i * nj + j) * d..(i * nj + j + 1) * d];
                            logits[i * nj + j] += dot(u, &vr[j * d..(j + 1) * d]);
                        }
                    }
                }
            }
            (cs, ss, vs)
        });
        let store = |dst: &mut [T], src: &[f64]| dst.iter_mut().zip(src).for_each(|(o, x)| *o = T::from_f64(*x));
        for (b, (cs, ss, vs)) in per_image.iter().enumerate() {
            store(&mut saved.c[b * rounds * ni * nj..(b + 1) * rounds * ni * nj], cs);
            store(&mut saved.s[b * rounds * nj * d..(b + 1) * rounds * nj * d], ss);
            store(&mut saved.v[b * rounds * nj * d..(b + 1) * rounds * nj * d], vs);
            store(&mut v[b * nj * d..(b + 1) * nj * d], &vs[(rounds - 1) * nj * d..]);
        }
        Ok(())
    }

    fn routing_bwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        uhat: &Vec<T>,
        saved: &RoutingSaved<Vec<T>>,
        dv: &Vec<T>,
        duhat: &mut Vec<T>,
    ) -> Result<()> {
        const OP: &str = "routing_bwd";
        let (ni, nj, d) = (s.in_caps, s.out_caps, s.out_dim);
        check_routing(OP, s, rounds, uhat.len(), [saved.c.len(), saved.s.len(), saved.v.len()])?;
        check_routing_bwd(s, dv.len(), duhat.len())?;
        par_rows(duhat, ni * nj * d, rounds * ni * nj * d * 4, |b, dub| {
            let uh: Vec<f64> = uhat[b * ni * nj * d..(b + 1) * ni * nj * d]
                .iter()
                .map(|x| x.to_f64())
                .collect();
            let cs = &saved.c[b * rounds * ni * nj..(b + 1) * rounds * ni * nj];
            let ss = &saved.s[b * rounds * nj * d..(b + 1) * rounds * nj * d];
            let vs = &saved.v[b * rounds * nj * d..(b + 1) * rounds * nj * d];
            let mut duh = vec![0.0; ni * nj * d];
            // gradient with respect to the logits b_{r+1} entering the round after this one
            let mut db_next = vec![0.0; ni * nj];
            let mut dvr = vec![0.0; nj * d];
            let mut ds = vec![0.0; nj * d];
            let mut dc = vec![0.0; ni * nj];
            for r in (0..rounds).rev() {
                let c: Vec<f64> = cs[r * ni * nj..(r + 1) * ni * nj].iter().map(|x| x.to_f64()).collect();
                let sr: Vec<f64> = ss[r * nj * d..(r + 1) * nj * d].iter().map(|x| x.to_f64()).collect();
                let vr: Vec<f64> = vs[r * nj * d..(r + 1) * nj * d].iter().map(|x| x.to_f64()).collect();
                if r + 1 == rounds {
                    // only the last round's v is the op's output
                    dvr.iter_mut()
                        .zip(&dv[b * nj * d..(b + 1) * nj * d])
                        .for_each(|(o, x)| *o = x.to_f64());
                } else {
                    // b_{r+1} = b_r + û·v_r: v_r and û receive db_{r+1}
                    dvr.fill(0.0);
                    for i in 0..ni {
                        for j in 0..nj {
                            let g = db_next[i * nj + j];
                            let k = (i * nj + j) * d;
                            for t in 0..d {
                                dvr[j * d + t] += g * uh[k + t];
                                duh[k + t] += g * vr[j * d + t];
                            }
                        }
                    }
                }
                ds.fill(0.0);
                for j in 0..nj {
                    squash_vec_bwd(
                        &sr[j * d..(j + 1) * d],
                        &dvr[j * d..(j + 1) * d],
                        &mut ds[j * d..(j + 1) * d],
                    );
                }
                // s_j = Σ_i c_ij û_{j|i}
                for i in 0..ni {
                    for j in 0..nj {
                        let k = (i * nj + j) * d;
                        let dsj = &ds[j * d..(j + 1) * d];
                        for t in 0..d {
                            duh[k + t] += c[i * nj + j] * dsj[t];
                        }
                        dc[i * nj + j] = dot(&uh[k..k + d], dsj);
                    }
                }
                // c_i = softmax(b_i): db_ij = c_ij (dc_ij − Σ_j' c_ij' dc_ij'); b_r also flows on to b_{r+1}
                for i in 0..ni {
                    let ci = &c[i * nj..(i + 1) * nj];
                    let dci = &dc[i * nj..(i + 1) * nj];
                    let m = dot(ci, dci);
                    for j in 0..nj {
                        db_next[i * nj + j] += ci[j] * (dci[j] - m);
                    }
                }
            }
            add_into(dub, &duh);
        });
        Ok(())
    }
}
