//! Dense layers, biases and activations on the CPU reference backend (f64 sums).

use crate::Result;
use crate::backend::cpu::{CpuBackend, add_into};
use crate::backend::linalg::gemm;
use crate::float::Float;

use super::{
    Act, DenseOps, DenseShape, check_act_bwd, check_bias_bwd, check_dense_bwd_input, check_dense_bwd_weight,
    check_dense_fwd,
};

pub(crate) fn act_fwd(act: Act, x: f64) -> f64 {
    match act {
        Act::None => x,
        Act::Relu => x.max(0.0),
        Act::Sigmoid => {
            if x >= 0.0 {
                1.0 / (1.0 + (-x).exp())
            } else {
                let e = x.exp();
                e / (1.0 + e)
            }
        }
    }
}

/// d act / dx, written in terms of the activation's output y.
pub(crate) fn act_deriv(act: Act, y: f64) -> f64 {
    match act {
        Act::None => 1.0,
        Act::Relu => {
            if y > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Act::Sigmoid => y * (1.0 - y),
    }
}

impl<T: Float> DenseOps for CpuBackend<T> {
    fn dense_fwd(&self, s: &DenseShape, x: &Vec<T>, w: &Vec<T>, b: &Vec<T>, y: &mut Vec<T>, act: Act) -> Result<()> {
        check_dense_fwd(s, x.len(), w.len(), b.len(), y.len())?;
        let mut out = vec![0.0; s.rows * s.out];
        gemm(
            s.rows,
            s.inp,
            s.out,
            &self.operand(x),
            (s.inp, 1),
            &self.operand(w),
            (s.out, 1),
            &mut out,
            0.0,
        );
        for (yr, or) in y.chunks_mut(s.out).zip(out.chunks(s.out)) {
            for ((yv, ov), bv) in yr.iter_mut().zip(or).zip(b) {
                *yv = T::from_f64(act_fwd(act, ov + bv.to_f64()));
            }
        }
        Ok(())
    }

    fn dense_bwd_input(&self, s: &DenseShape, dz: &Vec<T>, w: &Vec<T>, dx: &mut Vec<T>) -> Result<()> {
        check_dense_bwd_input(s, dz.len(), w.len(), dx.len())?;
        let mut dxf = vec![0.0; s.rows * s.inp];
        gemm(
            s.rows,
            s.out,
            s.inp,
            &self.operand(dz),
            (s.out, 1),
            &self.operand(w),
            (1, s.out),
            &mut dxf,
            0.0,
        );
        add_into(dx, &dxf);
        Ok(())
    }

    fn dense_bwd_weight(&self, s: &DenseShape, x: &Vec<T>, dz: &Vec<T>, dw: &mut Vec<T>) -> Result<()> {
        check_dense_bwd_weight(s, x.len(), dz.len(), dw.len())?;
        let mut dwf = vec![0.0; s.inp * s.out];
        gemm(
            s.inp,
            s.rows,
            s.out,
            &self.operand(x),
            (1, s.inp),
            &self.operand(dz),
            (s.out, 1),
            &mut dwf,
            0.0,
        );
        add_into(dw, &dwf);
        Ok(())
    }

    fn bias_bwd(&self, rows: usize, cols: usize, dz: &Vec<T>, db: &mut Vec<T>) -> Result<()> {
        check_bias_bwd(rows, cols, dz.len(), db.len())?;
        let mut acc = vec![0.0; cols];
        for r in dz.chunks(cols.max(1)) {
            for (a, v) in acc.iter_mut().zip(r) {
                *a += v.to_f64();
            }
        }
        add_into(db, &acc);
        Ok(())
    }

    fn act_bwd(&self, act: Act, y: &Vec<T>, dy: &Vec<T>, dz: &mut Vec<T>) -> Result<()> {
        check_act_bwd(y.len(), dy.len(), dz.len())?;
        for ((o, yv), g) in dz.iter_mut().zip(y).zip(dy) {
            *o = T::from_f64(g.to_f64() * act_deriv(act, yv.to_f64()));
        }
        Ok(())
    }
}
