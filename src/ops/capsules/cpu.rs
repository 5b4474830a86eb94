//! Capsule ops on the CPU reference backend (f64 sums).

use crate::Result;
use crate::backend::cpu::{CpuBackend, add_into};
use crate::float::Float;
use crate::par::par_rows;

use super::host;

use super::{
    CapsShape, CapsuleOps, NORM_EPS, check_lengths_bwd, check_lengths_fwd, check_predict_bwd_input,
    check_predict_bwd_weight, check_predict_fwd, check_squash_bwd, check_squash_fwd,
};

/// squash of one vector, in f64.
pub(crate) fn squash_vec(s: &[f64], v: &mut [f64]) {
    let n2: f64 = s.iter().map(|x| x * x).sum();
    let f = n2 / ((1.0 + n2) * (n2 + NORM_EPS).sqrt());
    for (o, x) in v.iter_mut().zip(s) {
        *o = f * x;
    }
}

/// ds += (∂squash(s)/∂s)ᵀ dv. With n = ‖s‖², v = f(n) s, f(n) = n g(n), g(n) = 1 / ((1+n) √(n+ε)):
/// ds = f dv + 2 f'(n) (dv·s) s, and f'(n) = g(n) (1/(1+n) − n / (2(n+ε))) is finite at n = 0.
pub(crate) fn squash_vec_bwd(s: &[f64], dv: &[f64], ds: &mut [f64]) {
    let n2: f64 = s.iter().map(|x| x * x).sum();
    let g = 1.0 / ((1.0 + n2) * (n2 + NORM_EPS).sqrt());
    let f = n2 * g;
    let fp = g * (1.0 / (1.0 + n2) - n2 / (2.0 * (n2 + NORM_EPS)));
    let dot: f64 = dv.iter().zip(s).map(|(a, b)| a * b).sum();
    for ((o, x), d) in ds.iter_mut().zip(s).zip(dv) {
        *o += f * d + 2.0 * fp * dot * x;
    }
}

impl<T: Float> CapsuleOps for CpuBackend<T> {
    fn squash_fwd(&self, rows: usize, dim: usize, s: &Vec<T>, v: &mut Vec<T>) -> Result<()> {
        check_squash_fwd(rows, dim, s.len(), v.len())?;
        let mut sf = vec![0.0; dim];
        let mut vf = vec![0.0; dim];
        for (vr, sr) in v.chunks_mut(dim.max(1)).zip(s.chunks(dim.max(1))) {
            sf.iter_mut().zip(sr).for_each(|(o, x)| *o = x.to_f64());
            squash_vec(&sf, &mut vf);
            vr.iter_mut().zip(&vf).for_each(|(o, x)| *o = T::from_f64(*x));
        }
        Ok(())
    }

    fn squash_bwd(&self, rows: usize, dim: usize, s: &Vec<T>, dv: &Vec<T>, ds: &mut Vec<T>) -> Result<()> {
        check_squash_bwd(rows, dim, s.len(), dv.len(), ds.len())?;
        let d = dim.max(1);
        for ((dsr, sr), dvr) in ds.chunks_mut(d).zip(s.chunks(d)).zip(dv.chunks(d)) {
            let sf: Vec<f64> = sr.iter().map(|x| x.to_f64()).collect();
            let dvf: Vec<f64> = dvr.iter().map(|x| x.to_f64()).collect();
            let mut acc = vec![0.0; dim];
            squash_vec_bwd(&sf, &dvf, &mut acc);
            add_into(dsr, &acc);
        }
        Ok(())
    }

    fn predict_fwd(&self, s: &CapsShape, u: &Vec<T>, w: &Vec<T>, uhat: &mut Vec<T>) -> Result<()> {
        check_predict_fwd(s, u.len(), w.len(), uhat.len())?;
        let (ni, nj, dout, din) = (s.in_caps, s.out_caps, s.out_dim, s.in_dim);
        par_rows(uhat, ni * nj * dout, ni * nj * dout * din, |b, out| {
            for i in 0..ni {
                let ui = &u[(b * ni + i) * din..(b * ni + i + 1) * din];
                for jk in 0..nj * dout {
                    let wr = &w[(i * nj * dout + jk) * din..(i * nj * dout + jk + 1) * din];
                    let acc: f64 = wr.iter().zip(ui).map(|(a, x)| a.to_f64() * x.to_f64()).sum();
                    out[i * nj * dout + jk] = T::from_f64(acc);
                }
            }
        });
        Ok(())
    }

    fn predict_bwd_input(&self, s: &CapsShape, duhat: &Vec<T>, w: &Vec<T>, du: &mut Vec<T>) -> Result<()> {
        check_predict_bwd_input(s, duhat.len(), w.len(), du.len())?;
        let (ni, nj, dout, din) = (s.in_caps, s.out_caps, s.out_dim, s.in_dim);
        par_rows(du, ni * din, ni * nj * dout * din, |b, dub| {
            let mut acc = vec![0.0; din];
            for i in 0..ni {
                acc.fill(0.0);
                for jk in 0..nj * dout {
                    let g = duhat[(b * ni + i) * nj * dout + jk].to_f64();
                    let wr = &w[(i * nj * dout + jk) * din..(i * nj * dout + jk + 1) * din];
                    for (a, wv) in acc.iter_mut().zip(wr) {
                        *a += g * wv.to_f64();
                    }
                }
                add_into(&mut dub[i * din..(i + 1) * din], &acc);
            }
        });
        Ok(())
    }

    fn predict_bwd_weight(&self, s: &CapsShape, u: &Vec<T>, duhat: &Vec<T>, dw: &mut Vec<T>) -> Result<()> {
        check_predict_bwd_weight(s, u.len(), duhat.len(), dw.len())?;
        let (ni, nj, dout, din) = (s.in_caps, s.out_caps, s.out_dim, s.in_dim);
        // one row per primary capsule i: the sum over the batch stays inside one thread
        par_rows(dw, nj * dout * din, s.batch * nj * dout * din, |i, dwi| {
            let mut acc = vec![0.0; nj * dout * din];
            for b in 0..s.batch {
                let ui = &u[(b * ni + i) * din..(b * ni + i + 1) * din];
                for jk in 0..nj * dout {
                    let g = duhat[(b * ni + i) * nj * dout + jk].to_f64();
                    for (a, x) in acc[jk * din..(jk + 1) * din].iter_mut().zip(ui) {
                        *a += g * x.to_f64();
                    }
                }
            }
            add_into(dwi, &acc);
        });
        Ok(())
    }

    fn lengths_fwd(&self, rows: usize, dim: usize, v: &Vec<T>, l: &mut Vec<T>) -> Result<()> {
        check_lengths_fwd(rows, dim, v.len(), l.len())?;
        for (o, vr) in l.iter_mut().zip(v.chunks(dim.max(1))) {
            let n2: f64 = vr.iter().map(|x| x.to_f64() * x.to_f64()).sum();
            *o = T::from_f64((n2 + NORM_EPS).sqrt());
        }
        Ok(())
    }

    fn lengths_bwd(&self, rows: usize, dim: usize, v: &Vec<T>, l: &Vec<T>, dl: &Vec<T>, dv: &mut Vec<T>) -> Result<()> {
        check_lengths_bwd(rows, dim, v.len(), l.len(), dl.len(), dv.len())?;
        for (r, dvr) in dv.chunks_mut(dim.max(1)).enumerate() {
            let k = dl[r].to_f64() / l[r].to_f64();
            for (o, x) in dvr.iter_mut().zip(&v[r * dim..(r + 1) * dim]) {
                *o = T::from_f64(o.to_f64() + k * x.to_f64());
            }
        }
        Ok(())
    }

    fn mask_fwd(
        &self,
        batch: usize,
        caps: usize,
        dim: usize,
        v: &Vec<T>,
        idx: &Vec<u32>,
        out: &mut Vec<T>,
    ) -> Result<()> {
        host::mask_fwd(batch, caps, dim, v, idx, out)
    }

    fn mask_bwd(
        &self,
        batch: usize,
        caps: usize,
        dim: usize,
        dout: &Vec<T>,
        idx: &Vec<u32>,
        dv: &mut Vec<T>,
    ) -> Result<()> {
        host::mask_bwd(batch, caps, dim, dout, idx, dv)
    }

    fn argmax(&self, rows: usize, cols: usize, x: &Vec<T>, idx: &mut Vec<u32>) -> Result<()> {
        host::argmax(rows, cols, x, idx)
    }
}
