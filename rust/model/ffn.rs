//! The feed-forward block of a layer: one gated FFN (llama, qwen2, gemma3), or a router and
//! gated experts (Mixtral, Grok-1; the routing rules are in `moe`).

use crate::error::Result;
use crate::kernels::matmul::{matmul, matmul_gated, ActivationBatch, GateFn, WeightMatrix};
use crate::kernels::{ggml_f32, ops};
use crate::model::config::FfnActivation;
use crate::model::moe::{self, ExpertGroups, Route};
use crate::model::weights::{FfnWeights, MoeFfn};
use crate::threads::ThreadPool;

/// Buffers reused from call to call so the decode loop does not allocate.
#[derive(Default)]
pub(crate) struct FfnScratch {
    gated: GatedScratch,
    moe: MoeScratch,
}

#[derive(Default)]
struct GatedScratch {
    acts: ActivationBatch,
    hidden_acts: ActivationBatch,
    /// `act(gate · x) * (up · x)`, the input of the down projection.
    hidden: Vec<f32>,
}

#[derive(Default)]
struct MoeScratch {
    router_logits: Vec<f32>,
    probs: Vec<f32>,
    routes: Vec<Route>,
    groups: ExpertGroups,
    /// The inputs of the tokens routed to one expert, gathered contiguously.
    rows: Vec<f32>,
    expert_out: Vec<f32>,
}

fn resize(buf: &mut Vec<f32>, len: usize) {
    buf.clear();
    buf.resize(len, 0.0);
}

/// `out = FFN(x)` for the tokens `places` describes (each one's `(index, len)` in its
/// llama.cpp batch, see `transformer::BatchPlace`): `x` and `out` are `n × d` row-major.
#[allow(clippy::too_many_arguments)]
pub(crate) fn feed_forward(
    pool: &ThreadPool,
    ffn: &FfnWeights,
    activation: FfnActivation,
    file: &[u8],
    x: &[f32],
    places: &[(usize, usize)],
    d: usize,
    s: &mut FfnScratch,
    out: &mut [f32],
) -> Result<()> {
    let n = places.len();
    match ffn {
        FfnWeights::Dense(f) => gated_ffn(
            pool,
            [&f.gate, &f.up, &f.down],
            activation,
            file,
            x,
            Rows::Placed(places),
            d,
            &mut s.gated,
            out,
        ),
        FfnWeights::Moe(m) => experts_ffn(pool, m, activation, file, x, n, d, s, out),
    }
}

/// The rows of a product: `n` rows multiplied as one batch, or rows placed in batches.
#[derive(Clone, Copy)]
enum Rows<'a> {
    Batch(usize),
    Placed(&'a [(usize, usize)]),
}

impl Rows<'_> {
    fn len(self) -> usize {
        match self {
            Rows::Batch(n) => n,
            Rows::Placed(places) => places.len(),
        }
    }

    fn set_input(self, acts: &mut ActivationBatch, width: usize) {
        match self {
            Rows::Batch(n) => acts.set_input(n, width),
            Rows::Placed(places) => acts.set_input_placed(places, width),
        }
    }
}

/// `down(act(gate·x) * (up·x))` for `rows` of width `d`.
#[allow(clippy::too_many_arguments)]
fn gated_ffn(
    pool: &ThreadPool,
    [gate, up, down]: [&WeightMatrix; 3],
    activation: FfnActivation,
    file: &[u8],
    x: &[f32],
    rows: Rows<'_>,
    d: usize,
    s: &mut GatedScratch,
    out: &mut [f32],
) -> Result<()> {
    let n_ff = gate.n_rows;
    // The gated product writes every value, so the buffer is not cleared first: zeroing
    // it (1.5 MB for a 255-token prefill of SmolLM2) was serial work on the calling thread,
    // once per layer, while the pool's other threads waited.
    s.hidden.resize(rows.len() * n_ff, 0.0);
    rows.set_input(&mut s.acts, d);
    s.acts.prepare(pool, gate.ty, x)?;
    s.acts.prepare(pool, up.ty, x)?;
    matmul_gated(
        pool,
        file,
        gate,
        s.acts.get(gate.ty)?,
        up,
        s.acts.get(up.ty)?,
        activation_function(activation),
        &mut s.hidden,
    )?;
    rows.set_input(&mut s.hidden_acts, n_ff);
    s.hidden_acts.prepare(pool, down.ty, &s.hidden)?;
    matmul(pool, down, file, s.hidden_acts.get(down.ty)?, out)
}

fn activation_function(activation: FfnActivation) -> GateFn {
    match activation {
        FfnActivation::Silu => ggml_f32::swiglu_in_place,
        FfnActivation::GeluTanh => ops::geglu_tanh_in_place,
        FfnActivation::GeluTanhF16Table => ops::geglu_tanh_f16_rounded_in_place,
    }
}

/// Routes every token, then runs each chosen expert once over all the tokens that chose it
/// and adds `gate × expert output` into those tokens' rows of `out`.
#[allow(clippy::too_many_arguments)]
fn experts_ffn(
    pool: &ThreadPool,
    m: &MoeFfn,
    activation: FfnActivation,
    file: &[u8],
    x: &[f32],
    n: usize,
    d: usize,
    s: &mut FfnScratch,
    out: &mut [f32],
) -> Result<()> {
    let n_expert = m.config.n_expert;
    let ms = &mut s.moe;
    resize(&mut ms.router_logits, n * n_expert);
    s.gated.acts.set_input(n, d);
    s.gated.acts.prepare(pool, m.router.ty, x)?;
    matmul(
        pool,
        &m.router,
        file,
        s.gated.acts.get(m.router.ty)?,
        &mut ms.router_logits,
    )?;
    ms.groups.reset(n_expert);
    for (t, logits) in ms.router_logits.chunks_exact(n_expert).enumerate() {
        ms.routes.clear();
        moe::route(
            logits,
            m.config.n_expert_used,
            m.config.renormalize_gates,
            &mut ms.probs,
            &mut ms.routes,
        );
        ms.routes.iter().for_each(|&r| ms.groups.add(t, r));
    }

    out.fill(0.0);
    for (e, members) in ms.groups.non_empty() {
        ms.rows.clear();
        for &(t, _) in members {
            ms.rows.extend_from_slice(&x[t * d..(t + 1) * d]);
        }
        resize(&mut ms.expert_out, members.len() * d);
        gated_ffn(
            pool,
            [m.gate.expert(e), m.up.expert(e), m.down.expert(e)],
            activation,
            file,
            &ms.rows,
            Rows::Batch(members.len()),
            d,
            &mut s.gated,
            &mut ms.expert_out,
        )?;
        for (&(t, gate), y) in members.iter().zip(ms.expert_out.chunks_exact(d)) {
            for (o, &v) in out[t * d..(t + 1) * d].iter_mut().zip(y) {
                *o += gate * v;
            }
        }
    }
    Ok(())
}
