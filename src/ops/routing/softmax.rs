//! The couplings' softmax over each capsule's row of logits, forward and backward: shared by the fast
//! CPU backend's portable and AVX-512 image loops.

/// out = softmax(x) over one row.
pub(super) fn softmax_row(x: &[f32], out: &mut [f32]) {
    let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut z = 0.0;
    for (o, v) in out.iter_mut().zip(x) {
        *o = (v - m).exp();
        z += *o;
    }
    let r = 1.0 / z;
    out.iter_mut().for_each(|o| *o *= r);
}

/// db_ij += c_ij (dc_ij − Σ_j' c_ij' dc_ij') for each row i of `nj` couplings c = softmax(b): the
/// gradient through the softmax of each row, added.
pub(super) fn softmax_rows_bwd_add(nj: usize, c: &[f32], dc: &[f32], db: &mut [f32]) {
    for ((ci, dci), dbi) in c.chunks(nj).zip(dc.chunks(nj)).zip(db.chunks_mut(nj)) {
        let m: f32 = ci.iter().zip(dci).map(|(a, b)| a * b).sum();
        for ((o, cv), dcv) in dbi.iter_mut().zip(ci).zip(dci) {
            *o += cv * (dcv - m);
        }
    }
}
