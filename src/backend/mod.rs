//! The op interface. Every op the model needs is a pair (or triple) of functions here, with the same
//! names the CUDA kernels will carry (`<op>_fwd`, `<op>_bwd_*`). The CPU implementation in
//! [`cpu`] is the reference: the spec every other backend is tested against.
//!
//! Conventions shared by every backend:
//! - Layouts are row-major and channels-last: images [B, H, W, C], conv kernels [K, K, Cin, Cout]
//!   (TensorFlow's HWIO), dense kernels [in, out], capsule weights W [I, J, Dout, Din].
//! - Accumulation rule: a function that writes the gradient of a tape variable (every `d*`
//!   argument of a `*_bwd_*` function) ADDS to it; the tape zeroes gradients once per backward pass.
//!   The only exception is [`Backend::act_bwd`], which writes a temporary and overwrites it.
//! - Scalars such as losses live in one-element buffers, so that a device backend never needs a
//!   host round trip inside a step; the incoming gradient of a loss (`dloss`) is such a buffer too.

pub mod cpu;
pub mod fast;
mod host;
pub(crate) mod linalg;

use crate::float::Float;
use crate::{Error, Result};

/// Every backend checks buffer lengths against the shapes it was given: `op: what has N elements, expected M`.
pub(crate) fn check(op: &str, what: &str, len: usize, expected: usize) -> Result<()> {
    if len != expected {
        return Err(Error::msg(format!(
            "{op}: {what} has {len} elements, expected {expected}"
        )));
    }
    Ok(())
}

/// A zeroed vector of `n` values; a failed allocation is an error that says so, not an abort.
pub(crate) fn alloc_zeros<T: Default + Clone>(n: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        Error::msg(format!(
            "out of memory: cannot allocate {} MiB for a tensor of {n} values",
            (n as u128 * std::mem::size_of::<T>() as u128) >> 20
        ))
    })?;
    v.resize(n, T::default());
    Ok(v)
}

/// A class index (label or prediction) checked against the number of classes.
pub(crate) fn class_index(op: &str, k: u32, n: usize) -> Result<usize> {
    if (k as usize) < n {
        Ok(k as usize)
    } else {
        Err(Error::msg(format!("{op}: class index {k} out of range 0..{n}")))
    }
}

/// `per` labels for each of `batch` images: at least one each, `labels` of them in all.
pub(crate) fn check_labels(op: &str, batch: usize, per: usize, labels: usize) -> Result<()> {
    if per == 0 {
        return Err(Error::msg(format!("{op}: at least one label per image is needed")));
    }
    check(op, "labels", labels, batch * per)
}

/// The routing op's common preconditions: at least one round, û and the saved buffers' lengths.
pub(crate) fn check_routing(op: &str, s: &CapsShape, rounds: usize, uhat: usize, saved: [usize; 3]) -> Result<()> {
    if rounds == 0 {
        return Err(Error::msg(format!("{op}: at least one routing round is needed")));
    }
    check(op, "uhat", uhat, s.uhat_len())?;
    let per_round = s.batch * rounds * s.out_caps;
    check(op, "saved.c", saved[0], per_round * s.in_caps)?;
    check(op, "saved.s", saved[1], per_round * s.out_dim)?;
    check(op, "saved.v", saved[2], per_round * s.out_dim)
}

/// Adam's preconditions for parameter group `n`: gradient and moments as long as the parameter.
pub(crate) fn check_adam_group(n: usize, param: usize, grad: usize, m: usize, v: usize) -> Result<()> {
    check("adam_step", &format!("grad of group {n}"), grad, param)?;
    check("adam_step", &format!("m of group {n}"), m, param)?;
    check("adam_step", &format!("v of group {n}"), v, param)
}

/// [`Backend::caps_routing_fwd`] as two ops: [`Backend::predict_fwd`] into a temporary û, then
/// [`Backend::routing_fwd`] (the default, and what a fusing backend runs for its unfused versions).
pub fn caps_routing_fwd_unfused<B: Backend + ?Sized>(
    be: &B,
    s: &CapsShape,
    rounds: usize,
    u: &B::Buf,
    w: &B::Buf,
    v: &mut B::Buf,
    saved: &mut RoutingSaved<B::Buf>,
) -> Result<()> {
    let mut uhat = be.alloc_out(s.uhat_len())?;
    be.predict_fwd(s, u, w, &mut uhat)?;
    be.routing_fwd(s, rounds, &uhat, v, saved)
}

/// [`Backend::caps_routing_bwd`] as separate ops: û recomputed, [`Backend::routing_bwd`] into a
/// temporary dû, then the prediction's input and weight gradients.
#[allow(clippy::too_many_arguments)]
pub fn caps_routing_bwd_unfused<B: Backend + ?Sized>(
    be: &B,
    s: &CapsShape,
    rounds: usize,
    u: &B::Buf,
    w: &B::Buf,
    saved: &RoutingSaved<B::Buf>,
    dv: &B::Buf,
    du: Option<&mut B::Buf>,
    dw: Option<&mut B::Buf>,
) -> Result<()> {
    if du.is_none() && dw.is_none() {
        return Ok(());
    }
    let mut uhat = be.alloc_out(s.uhat_len())?;
    be.predict_fwd(s, u, w, &mut uhat)?;
    let mut duhat = be.zeros(s.uhat_len())?;
    be.routing_bwd(s, rounds, &uhat, saved, dv, &mut duhat)?;
    if let Some(du) = du {
        be.predict_bwd_input(s, &duhat, w, du)?;
    }
    if let Some(dw) = dw {
        be.predict_bwd_weight(s, u, &duhat, dw)?;
    }
    Ok(())
}

/// `bytes` packed four to a little-endian u32 (the last word padded with zeros).
pub fn pack_bytes(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|c| c.iter().enumerate().fold(0u32, |w, (k, &b)| w | (b as u32) << (8 * k)))
        .collect()
}

/// A data set resident on a backend, as [`Backend::gather_batch`] reads it.
pub struct ResidentSet<'a, B: Backend + ?Sized> {
    /// Bytes per image: a square image's side².
    pub pixels: usize,
    /// The images' bytes, packed four to a word ([`Backend::upload_bytes`]).
    pub images: &'a B::Idx,
    pub labels: &'a B::Idx,
    /// The examples in the order batches take them (an epoch's shuffle).
    pub order: &'a B::Idx,
    /// Per image, the shift that moves it this epoch ([`pack_shift`]), or None.
    pub shifts: Option<&'a B::Idx>,
}

/// A shift (dx, dy), each within ±127 (right and down positive), as [`ResidentSet::shifts`] holds it.
pub fn pack_shift((dx, dy): (i32, i32)) -> u32 {
    ((dx + 128) as u32 & 0xff) | ((dy + 128) as u32 & 0xff) << 8
}

/// [`Backend::gather_batch`] on host data, checked: pixels / 255 in f64 (the data loader's scaling,
/// before it rounds to the backend's type), each image moved by its shift
/// ([`crate::data::shift_images`]) where `shifts` holds them, and labels of images order[start ..
/// start + batch].
pub fn gather_host(
    pixels: usize,
    words: &[u32],
    labels: &[u32],
    order: &[u32],
    shifts: Option<&[u32]>,
    start: usize,
    batch: usize,
) -> Result<(Vec<f64>, Vec<u32>)> {
    if start + batch > order.len() {
        return Err(Error::msg(format!(
            "gather_batch: images {start}..{} of an order of {}",
            start + batch,
            order.len()
        )));
    }
    let (mut xs, mut ys) = (Vec::with_capacity(batch * pixels), Vec::with_capacity(batch));
    for &img in &order[start..start + batch] {
        let img = img as usize;
        if img >= labels.len() || (img + 1) * pixels > 4 * words.len() {
            return Err(Error::msg(format!(
                "gather_batch: image {img} of {} images",
                labels.len()
            )));
        }
        let at = xs.len();
        for p in img * pixels..(img + 1) * pixels {
            let byte = (words[p / 4] >> (8 * (p % 4))) & 0xff;
            xs.push(byte as f64 / 255.0);
        }
        if let Some(shifts) = shifts {
            let side = image_side(pixels)?;
            let w = *shifts
                .get(img)
                .ok_or_else(|| Error::msg(format!("gather_batch: no shift for image {img}")))?;
            let shift = ((w & 0xff) as i32 - 128, ((w >> 8) & 0xff) as i32 - 128);
            crate::data::shift_images(&mut xs[at..], side, &[shift]);
        }
        ys.push(labels[img]);
    }
    Ok((xs, ys))
}

/// The side of a square image of `pixels` pixels, or why there is none.
pub fn image_side(pixels: usize) -> Result<usize> {
    let side = (pixels as f64).sqrt().round() as usize;
    if side * side != pixels {
        return Err(Error::msg(format!(
            "gather_batch: {pixels} pixels are not a square image"
        )));
    }
    Ok(side)
}

/// ε inside the square root of every safe norm (squash and capsule lengths): a zero vector then has
/// a finite norm (√ε) and a finite gradient.
pub const NORM_EPS: f64 = 1e-7;

/// Margin loss constants of the paper: T_k max(0, m+ − ‖v_k‖)² + λ (1 − T_k) max(0, ‖v_k‖ − m−)².
pub const M_PLUS: f64 = 0.9;
pub const M_MINUS: f64 = 0.1;
pub const LAMBDA: f64 = 0.5;

/// A valid (unpadded) 2-D convolution over channels-last images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub batch: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub in_c: usize,
    pub out_c: usize,
    pub k: usize,
    pub stride: usize,
}

impl ConvShape {
    pub fn out_h(&self) -> usize {
        (self.in_h - self.k) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.in_w - self.k) / self.stride + 1
    }
    /// Length of one im2col row: K·K·Cin, ordered (ky, kx, c) like the kernel's first three axes.
    pub fn patch_len(&self) -> usize {
        self.k * self.k * self.in_c
    }
    pub fn x_len(&self) -> usize {
        self.batch * self.in_h * self.in_w * self.in_c
    }
    pub fn w_len(&self) -> usize {
        self.patch_len() * self.out_c
    }
    /// Output rows of the implicit GEMM: B·OH·OW.
    pub fn rows(&self) -> usize {
        self.batch * self.out_h() * self.out_w()
    }
    pub fn y_len(&self) -> usize {
        self.rows() * self.out_c
    }
    /// Multiply-accumulates of the forward pass.
    pub fn macs(&self) -> usize {
        self.rows() * self.patch_len() * self.out_c
    }
}

/// A dense layer y = act(x · W + b) over `rows` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenseShape {
    pub rows: usize,
    pub inp: usize,
    pub out: usize,
}

/// Prediction vectors û[b,i,j,:] = W[i,j] (out_dim × in_dim) · u[b,i,:].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapsShape {
    pub batch: usize,
    /// I: primary capsules (1152 in the paper's model).
    pub in_caps: usize,
    /// Primary capsule dimension (8).
    pub in_dim: usize,
    /// J: digit capsules (10).
    pub out_caps: usize,
    /// Digit capsule dimension (16).
    pub out_dim: usize,
}

impl CapsShape {
    pub fn u_len(&self) -> usize {
        self.batch * self.in_caps * self.in_dim
    }
    pub fn w_len(&self) -> usize {
        self.in_caps * self.out_caps * self.out_dim * self.in_dim
    }
    pub fn uhat_len(&self) -> usize {
        self.batch * self.in_caps * self.out_caps * self.out_dim
    }
    pub fn v_len(&self) -> usize {
        self.batch * self.out_caps * self.out_dim
    }
}

/// What the routing forward saves for its backward, per image and round:
/// c [B, R, I, J] (coupling coefficients), s [B, R, J, D] (weighted sums), v [B, R, J, D] (squashed).
pub struct RoutingSaved<Buf> {
    pub c: Buf,
    pub s: Buf,
    pub v: Buf,
}

/// Fused activation of conv and dense layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    Sigmoid,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// 1-based step number t of the update being made (bias corrections use β^t).
    pub step: u64,
}

impl AdamHyper {
    /// What a device's Adam kernel takes per step, in f32: lr and the bias corrections 1 − β1ᵗ and
    /// 1 − β2ᵗ, computed in f64.
    pub fn per_step_f32(&self) -> [f32; 3] {
        [
            self.lr as f32,
            (1.0 - self.beta1.powf(self.step as f64)) as f32,
            (1.0 - self.beta2.powf(self.step as f64)) as f32,
        ]
    }
}

/// Words before a step plan's first row: the cursor (see kernels/common.cuh).
pub const PLAN_HEADER: usize = 1;
/// Words per row of a step plan: the batch's first position, Adam's lr, bc1 and bc2 (f32 bits).
pub const PLAN_ROW: usize = 4;

/// One training step's row of a step plan ([`Backend::gather_planned`], [`Backend::adam_step_planned`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepRow {
    /// The batch's first position in the epoch's order.
    pub start: usize,
    pub adam: AdamHyper,
}

/// A step plan's words: the cursor at row `cursor`, then each row as kernels/common.cuh lays it out.
pub fn plan_words(cursor: usize, rows: &[StepRow]) -> Result<Vec<u32>> {
    let mut w = Vec::with_capacity(PLAN_HEADER + PLAN_ROW * rows.len());
    w.push(u32::try_from(cursor).map_err(|_| Error::msg("step plan: more than 2^32 steps"))?);
    for r in rows {
        let start = u32::try_from(r.start)
            .map_err(|_| Error::msg(format!("step plan: position {} does not fit 32 bits", r.start)))?;
        w.push(start);
        w.extend(r.adam.per_step_f32().map(f32::to_bits));
    }
    Ok(w)
}

/// The batch position in the current row of a step plan read back to the host.
pub fn plan_start(words: &[u32]) -> Result<usize> {
    let at = words
        .first()
        .map(|&c| PLAN_HEADER + PLAN_ROW * c as usize)
        .filter(|&at| at + PLAN_ROW <= words.len())
        .ok_or_else(|| Error::msg("step plan: the cursor is past the last row"))?;
    Ok(words[at] as usize)
}

/// A step captured on a backend ([`Backend::end_capture`]), to replay with [`Backend::launch_graph`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphId(pub usize);

/// One parameter tensor's slice of an Adam update.
pub struct AdamGroup<'a, B: Backend + ?Sized> {
    pub param: &'a mut B::Buf,
    pub grad: &'a B::Buf,
    pub m: &'a mut B::Buf,
    pub v: &'a mut B::Buf,
}

/// The `per` longest capsules of each image, longest first (ties: the lower class).
pub fn top_classes(lengths: &[f32], classes: usize, per: usize) -> Vec<u32> {
    lengths
        .chunks(classes)
        .flat_map(|l| {
            let mut k: Vec<u32> = (0..classes as u32).collect();
            k.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
            k.truncate(per);
            k
        })
        .collect()
}

/// (images whose `per` longest capsules are exactly their labels, labels found among them).
pub fn count_correct(top: &[u32], labels: &[u32], per: usize) -> (usize, usize) {
    let (mut exact, mut digits) = (0, 0);
    for (t, y) in top.chunks(per).zip(labels.chunks(per)) {
        let found = y.iter().filter(|l| t.contains(l)).count();
        digits += found;
        exact += (found == per) as usize;
    }
    (exact, digits)
}

/// The op interface. Shapes are passed explicitly; implementations check buffer lengths against them.
pub trait Backend: 'static {
    /// Element type of host transfers.
    type E: Float;
    /// A flat buffer of `E` values in this backend's memory.
    type Buf: 'static;
    /// A flat buffer of class indices (labels or predictions).
    type Idx: 'static;

    fn name(&self) -> String;

    /// Bytes of device memory this backend holds, where it has a device (the peak: the CUDA pool
    /// never returns memory to the driver).
    fn device_bytes(&self) -> Option<usize> {
        None
    }

    /// Waits until every op issued so far has finished (for timing; a no-op on the CPU).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    // ---- memory -------------------------------------------------------------------------------
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    fn upload(&self, host: &[Self::E]) -> Result<Self::Buf>;
    fn download(&self, buf: &Self::Buf) -> Result<Vec<Self::E>>;
    fn upload_idx(&self, host: &[u32]) -> Result<Self::Idx>;
    /// A buffer of `n` values for an op that overwrites every one of them: its contents are
    /// unspecified. The default zeroes it; a device backend hands out memory as it is, so no memset
    /// runs before a kernel that writes its whole output.
    fn alloc_out(&self, n: usize) -> Result<Self::Buf> {
        self.zeros(n)
    }
    /// [`Backend::alloc_out`] for class indices.
    fn alloc_idx(&self, n: usize) -> Result<Self::Idx> {
        self.upload_idx(&vec![0; n])
    }
    fn download_idx(&self, idx: &Self::Idx) -> Result<Vec<u32>>;
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    fn idx_len(&self, idx: &Self::Idx) -> usize;
    fn fill(&self, buf: &mut Self::Buf, value: f64) -> Result<()>;
    /// dst += src.
    fn add_assign(&self, dst: &mut Self::Buf, src: &Self::Buf) -> Result<()>;
    /// out = a + b (elementwise; all three the same length).
    fn add_fwd(&self, a: &Self::Buf, b: &Self::Buf, out: &mut Self::Buf) -> Result<()>;

    // ---- a data set resident on the backend ------------------------------------------------------
    /// Whether training keeps its data set on this backend ([`Backend::upload_bytes`],
    /// [`Backend::gather_batch`]) instead of copying each batch from the host: a device backend's
    /// choice, false here.
    fn keeps_data_resident(&self) -> bool {
        false
    }
    /// Bytes (a data set's pixels) on the backend, packed four to an index word, little-endian.
    fn upload_bytes(&self, bytes: &[u8]) -> Result<Self::Idx> {
        self.upload_idx(&pack_bytes(bytes))
    }
    /// One batch of a resident data set: x[b, p] = byte p of image order[start + b] / 255 and
    /// y[b] = labels[order[start + b]] for b < batch (x holds batch·pixels values, y batch), each image
    /// moved by its shift where the set has shifts ([`ResidentSet`]). `order` entries are below the
    /// number of images (a device reads none above: NaN pixels). This default reads the data back to
    /// the host.
    fn gather_batch(
        &self,
        set: &ResidentSet<'_, Self>,
        start: usize,
        batch: usize,
        x: &mut Self::Buf,
        y: &mut Self::Idx,
    ) -> Result<()> {
        check("gather_batch", "x", self.buf_len(x), batch * set.pixels)?;
        let (words, labels, order) = (
            self.download_idx(set.images)?,
            self.download_idx(set.labels)?,
            self.download_idx(set.order)?,
        );
        let shifts = set.shifts.map(|s| self.download_idx(s)).transpose()?;
        let (xs, ys) = gather_host(set.pixels, &words, &labels, &order, shifts.as_deref(), start, batch)?;
        *x = self.upload(&xs.iter().map(|&v| Self::E::from_f64(v)).collect::<Vec<_>>())?;
        *y = self.upload_idx(&ys)?;
        Ok(())
    }

    // ---- convolution: implicit GEMM [B·OH·OW, K·K·Cin] × [K·K·Cin, Cout] -------------------
    /// y = act(conv(x, w) + b).
    fn conv2d_fwd(
        &self,
        s: &ConvShape,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        y: &mut Self::Buf,
        act: Act,
    ) -> Result<()>;
    /// dx += conv_transpose(dz, w), where dz is the gradient before the activation.
    fn conv2d_bwd_input(&self, s: &ConvShape, dz: &Self::Buf, w: &Self::Buf, dx: &mut Self::Buf) -> Result<()>;
    /// dw += Σ over batch and positions of patch(x)ᵀ · dz.
    fn conv2d_bwd_weight(&self, s: &ConvShape, x: &Self::Buf, dz: &Self::Buf, dw: &mut Self::Buf) -> Result<()>;
    /// db[c] += Σ_r dz[r, c] over `rows` rows of `cols` columns (bias gradient of conv and dense).
    fn bias_bwd(&self, rows: usize, cols: usize, dz: &Self::Buf, db: &mut Self::Buf) -> Result<()>;
    /// dz = dy · act'(y), from the activation's output y. Overwrites dz (a temporary).
    fn act_bwd(&self, act: Act, y: &Self::Buf, dy: &Self::Buf, dz: &mut Self::Buf) -> Result<()>;

    // ---- dense layers ---------------------------------------------------------------------------
    /// y = act(x · w + b).
    fn dense_fwd(
        &self,
        s: &DenseShape,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        y: &mut Self::Buf,
        act: Act,
    ) -> Result<()>;
    /// dx += dz · wᵀ.
    fn dense_bwd_input(&self, s: &DenseShape, dz: &Self::Buf, w: &Self::Buf, dx: &mut Self::Buf) -> Result<()>;
    /// dw += xᵀ · dz.
    fn dense_bwd_weight(&self, s: &DenseShape, x: &Self::Buf, dz: &Self::Buf, dw: &mut Self::Buf) -> Result<()>;

    // ---- capsules -------------------------------------------------------------------------------
    /// v = squash(s) = ‖s‖² / (1 + ‖s‖²) · s / √(‖s‖² + ε), row by row ([rows, dim]).
    fn squash_fwd(&self, rows: usize, dim: usize, s: &Self::Buf, v: &mut Self::Buf) -> Result<()>;
    /// ds += (∂v/∂s)ᵀ dv.
    fn squash_bwd(&self, rows: usize, dim: usize, s: &Self::Buf, dv: &Self::Buf, ds: &mut Self::Buf) -> Result<()>;
    /// û[b,i,j,:] = W[i,j] · u[b,i,:].
    fn predict_fwd(&self, s: &CapsShape, u: &Self::Buf, w: &Self::Buf, uhat: &mut Self::Buf) -> Result<()>;
    /// du[b,i,:] += Σ_j W[i,j]ᵀ · dû[b,i,j,:].
    fn predict_bwd_input(&self, s: &CapsShape, duhat: &Self::Buf, w: &Self::Buf, du: &mut Self::Buf) -> Result<()>;
    /// dW[i,j] += Σ_b dû[b,i,j,:] ⊗ u[b,i,:].
    fn predict_bwd_weight(&self, s: &CapsShape, u: &Self::Buf, duhat: &Self::Buf, dw: &mut Self::Buf) -> Result<()>;
    /// Allocates what [`Backend::routing_fwd`] saves for `rounds` rounds.
    fn routing_saved(&self, s: &CapsShape, rounds: usize) -> Result<RoutingSaved<Self::Buf>> {
        let (b, i, j, d) = (s.batch, s.in_caps, s.out_caps, s.out_dim);
        Ok(RoutingSaved {
            c: self.zeros(b * rounds * i * j)?,
            s: self.zeros(b * rounds * j * d)?,
            v: self.zeros(b * rounds * j * d)?,
        })
    }
    /// Routing by agreement, all rounds: b = 0; per round c = softmax_j(b), s_j = Σ_i c_ij û_{j|i},
    /// v_j = squash(s_j), and (all but the last round) b_ij += û_{j|i} · v_j. Writes the last v.
    fn routing_fwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        uhat: &Self::Buf,
        v: &mut Self::Buf,
        saved: &mut RoutingSaved<Self::Buf>,
    ) -> Result<()>;
    /// dû += the gradient of the routing output with respect to û, through every round.
    fn routing_bwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        uhat: &Self::Buf,
        saved: &RoutingSaved<Self::Buf>,
        dv: &Self::Buf,
        duhat: &mut Self::Buf,
    ) -> Result<()>;
    /// Prediction vectors and routing in one op: v = routing(û) with û[b,i,j,:] = W[i,j] · u[b,i,:],
    /// saving what [`Backend::routing_fwd`] saves. A backend may fuse the two and never hold û; this
    /// default runs [`Backend::predict_fwd`] into a temporary û, then [`Backend::routing_fwd`].
    #[allow(clippy::too_many_arguments)]
    fn caps_routing_fwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        u: &Self::Buf,
        w: &Self::Buf,
        v: &mut Self::Buf,
        saved: &mut RoutingSaved<Self::Buf>,
    ) -> Result<()> {
        caps_routing_fwd_unfused(self, s, rounds, u, w, v, saved)
    }
    /// The gradients of [`Backend::caps_routing_fwd`]: du += ∂/∂u and dw += ∂/∂W of the loss whose
    /// gradient with respect to v is `dv` (either may be `None`: not wanted). This default recomputes
    /// û, runs [`Backend::routing_bwd`] into a temporary dû, then the prediction's backward.
    #[allow(clippy::too_many_arguments)]
    fn caps_routing_bwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        u: &Self::Buf,
        w: &Self::Buf,
        saved: &RoutingSaved<Self::Buf>,
        dv: &Self::Buf,
        du: Option<&mut Self::Buf>,
        dw: Option<&mut Self::Buf>,
    ) -> Result<()> {
        caps_routing_bwd_unfused(self, s, rounds, u, w, saved, dv, du, dw)
    }
    /// l[r] = √(Σ_d v[r,d]² + ε).
    fn lengths_fwd(&self, rows: usize, dim: usize, v: &Self::Buf, l: &mut Self::Buf) -> Result<()>;
    /// dv[r,:] += dl[r] · v[r,:] / l[r].
    fn lengths_bwd(
        &self,
        rows: usize,
        dim: usize,
        v: &Self::Buf,
        l: &Self::Buf,
        dl: &Self::Buf,
        dv: &mut Self::Buf,
    ) -> Result<()>;
    /// out[b, :] = v[b, :, :] with every capsule zeroed but capsule idx[b] ([B, J·D]).
    fn mask_fwd(
        &self,
        batch: usize,
        caps: usize,
        dim: usize,
        v: &Self::Buf,
        idx: &Self::Idx,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// dv[b, idx[b], :] += dout[b, idx[b]·D ..].
    fn mask_bwd(
        &self,
        batch: usize,
        caps: usize,
        dim: usize,
        dout: &Self::Buf,
        idx: &Self::Idx,
        dv: &mut Self::Buf,
    ) -> Result<()>;
    /// idx[r] = argmax_c x[r, c] (the first maximum).
    fn argmax(&self, rows: usize, cols: usize, x: &Self::Buf, idx: &mut Self::Idx) -> Result<()>;

    // ---- losses ---------------------------------------------------------------------------------
    /// loss[0] = mean over the batch of Σ_k margin terms (see [`M_PLUS`]). `labels` holds `per`
    /// classes per image ([batch, per]): each is present (T_k = 1), as MultiMNIST's two digits are.
    fn margin_loss_fwd(
        &self,
        batch: usize,
        classes: usize,
        per: usize,
        l: &Self::Buf,
        labels: &Self::Idx,
        loss: &mut Self::Buf,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn margin_loss_bwd(
        &self,
        batch: usize,
        classes: usize,
        per: usize,
        l: &Self::Buf,
        labels: &Self::Idx,
        dloss: &Self::Buf,
        dl: &mut Self::Buf,
    ) -> Result<()>;
    /// loss[0] = scale · (1/rows) Σ (pred − target)²: per-row sums of squares, mean over rows.
    fn sq_err_fwd(
        &self,
        rows: usize,
        cols: usize,
        pred: &Self::Buf,
        target: &Self::Buf,
        scale: f64,
        loss: &mut Self::Buf,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn sq_err_bwd(
        &self,
        rows: usize,
        cols: usize,
        pred: &Self::Buf,
        target: &Self::Buf,
        scale: f64,
        dloss: &Self::Buf,
        dpred: &mut Self::Buf,
    ) -> Result<()>;

    /// What a training step reports, in one buffer to read once: out = [loss, margin loss,
    /// reconstruction loss, images whose `per` longest capsules are exactly their labels, labels found
    /// among their image's `per` longest capsules] (ties go to the lower class, as [`Backend::argmax`]
    /// and [`top_classes`] breaks them). This default reads the inputs back and computes on the
    /// host; a device backend computes it on the device.
    #[allow(clippy::too_many_arguments)]
    fn step_summary(
        &self,
        batch: usize,
        classes: usize,
        per: usize,
        losses: [&Self::Buf; 3],
        lengths: &Self::Buf,
        labels: &Self::Idx,
        out: &mut Self::Buf,
    ) -> Result<()> {
        let labels = self.download_idx(labels)?;
        check_labels("step_summary", batch, per, labels.len())?;
        check("step_summary", "lengths", self.buf_len(lengths), batch * classes)?;
        let mut row = vec![];
        for l in losses {
            check("step_summary", "a loss", self.buf_len(l), 1)?;
            row.push(self.download(l)?[0]);
        }
        let l: Vec<f32> = self.download(lengths)?.iter().map(|x| x.to_f64() as f32).collect();
        let top = top_classes(&l, classes, per);
        let (exact, found) = count_correct(&top, &labels, per);
        row.extend([Self::E::from_f64(exact as f64), Self::E::from_f64(found as f64)]);
        *out = self.upload(&row)?;
        Ok(())
    }

    // ---- optimiser ------------------------------------------------------------------------------
    /// One Adam step (Kingma & Ba, Algorithm 1) over every parameter group.
    fn adam_step(&self, hp: &AdamHyper, groups: &mut [AdamGroup<'_, Self>]) -> Result<()>;
    /// [`Backend::adam_step`] unless `guard[0]` is not finite (a diverged loss): then no parameter or
    /// moment changes. The default reads the guard back; a device backend tests it on the device, so
    /// a step needs no host round trip before its update.
    fn adam_step_if_finite(&self, hp: &AdamHyper, groups: &mut [AdamGroup<'_, Self>], guard: &Self::Buf) -> Result<()> {
        match self.download(guard)?.first() {
            Some(g) if g.to_f64().is_finite() => self.adam_step(hp, groups),
            Some(_) => Ok(()),
            None => Err(Error::msg("adam_step_if_finite: the guard buffer is empty")),
        }
    }

    // ---- steps read from a plan, captured once and replayed ----------------------------------------
    /// Writes `host` over `dst`, which holds as many words. A device backend writes in place, so a
    /// captured step that reads `dst` sees the new words; this default replaces the buffer.
    fn write_idx(&self, dst: &mut Self::Idx, host: &[u32]) -> Result<()> {
        check("write_idx", "destination", self.idx_len(dst), host.len())?;
        *dst = self.upload_idx(host)?;
        Ok(())
    }
    /// [`Backend::gather_batch`] from the position in the current row of the step plan `plan`
    /// ([`plan_words`]), which a device reads there: a captured step gathers each step's batch. This
    /// default reads the plan back.
    fn gather_planned(
        &self,
        set: &ResidentSet<'_, Self>,
        plan: &Self::Idx,
        batch: usize,
        x: &mut Self::Buf,
        y: &mut Self::Idx,
    ) -> Result<()> {
        let start = plan_start(&self.download_idx(plan)?)?;
        self.gather_batch(set, start, batch, x, y)
    }
    /// [`Backend::adam_step_if_finite`] where the plan's current row was made from `hp`
    /// ([`plan_words`]): a device reads lr and the bias corrections from the row, so a captured step
    /// updates with each step's; this default takes them from `hp`.
    fn adam_step_planned(
        &self,
        hp: &AdamHyper,
        groups: &mut [AdamGroup<'_, Self>],
        guard: &Self::Buf,
        _plan: &Self::Idx,
    ) -> Result<()> {
        self.adam_step_if_finite(hp, groups, guard)
    }
    /// Moves the plan's cursor to the next row: the last op of a planned step.
    fn advance_plan(&self, plan: &mut Self::Idx) -> Result<()> {
        let mut w = self.download_idx(plan)?;
        plan_start(&w)?;
        w[0] += 1;
        self.write_idx(plan, &w)
    }
    /// Whether this backend can record a step's ops once ([`Backend::begin_capture`]) and replay
    /// them as one launch ([`Backend::launch_graph`]): false here.
    fn can_capture(&self) -> bool {
        false
    }
    /// From here until [`Backend::end_capture`], ops are recorded, not run. Every buffer they allocate
    /// stays the captured step's (it returns only to the step's own reserve), so a replay never writes
    /// memory that anything else was given; the buffers a step allocates must all be pooled already
    /// (an eager step of the same shapes ran before).
    fn begin_capture(&self) -> Result<()> {
        Err(Error::msg(format!("{} cannot capture steps", self.name())))
    }
    /// Ends the capture begun last (also after an op failed inside it); the recorded ops as a graph.
    fn end_capture(&self) -> Result<GraphId> {
        Err(Error::msg(format!("{} cannot capture steps", self.name())))
    }
    /// Runs a captured step again: the same ops on the same buffers.
    fn launch_graph(&self, _graph: GraphId) -> Result<()> {
        Err(Error::msg(format!("{} cannot capture steps", self.name())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_longest_capsules_must_be_exactly_the_two_labels() {
        let l = [
            0.1, 0.9, 0.2, 0.8, /* */ 0.7, 0.1, 0.1, 0.6, /* */ 0.5, 0.5, 0.9, 0.1,
        ];
        let top = top_classes(&l, 4, 2);
        assert_eq!(top, vec![1, 3, 0, 3, 2, 0]);
        // labels {3, 1} (any order): exact; {0, 2}: one found; {2, 1}: one found
        assert_eq!(count_correct(&top, &[3, 1, 0, 2, 2, 1], 2), (1, 4));
        assert_eq!(count_correct(&top_classes(&l, 4, 1), &[1, 0, 2], 1), (3, 3));
    }
}
