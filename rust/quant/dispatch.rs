//! Run-time choice of the dot-product and activation-quantisation kernels.
//!
//! One binary serves every CPU of its architecture: SIMD kernels are `#[target_feature]`
//! functions that are only reachable through a table built after the CPU was asked
//! (`is_x86_feature_detected!`, `is_aarch64_feature_detected!`), so a wheel built for
//! baseline x86-64 or AArch64 uses the best kernels present and never executes an
//! instruction the CPU lacks. The CPU is examined once; `SAMPLER_SDK_SIMD=<level>` forces a
//! lower level of the same architecture (tests use it to run every kernel set on one
//! machine).
//!
//! Levels:
//! - `scalar`: the portable kernels of `dot_scalar` (the reference every other level is
//!   tested against);
//! - `avx2`: AVX2 + FMA + F16C (Haswell, Zen 1 and later);
//! - `avx512`: the `avx2` set plus AVX-512 F/BW/VL and VNNI (Ice Lake, Sapphire Rapids,
//!   Zen 4 and later). A CPU with AVX-512 but no VNNI (Skylake-SP) gets `avx2`: without
//!   `vpdpbusd` the 8-bit products need the same instruction count as in AVX2, and wider
//!   registers alone do not pay for the frequency drop those CPUs take;
//! - `neon`: base AArch64 NEON (`dot_neon`, with the bits of llama.cpp built for `armv8-a`);
//! - `dotprod`: NEON plus the Armv8.2 dot product `sdot` (Cortex-A76/Neoverse N1, Apple M1
//!   and later), with the bits of llama.cpp built for `armv8.2-a+dotprod`. The two Arm
//!   levels round differently (see `dot_neon`), as the two llama.cpp builds do.

use std::sync::OnceLock;

use super::activation::{self, QuantizedActivations};
use super::dot::{Dot4Fn, DotBatchFn, DotFn, DotTokensFn};
use super::dot_scalar as scalar;
use super::token_lanes::DotLanesFn;
use super::GgmlType;

/// Quantises activations `x` (whole blocks) into `out` (exactly the bytes they need).
pub type QuantizeFn = fn(x: &[f32], out: &mut [u8]);

/// The environment variable that forces a kernel set.
pub const SIMD_ENV: &str = "SAMPLER_SDK_SIMD";

/// A kernel set. Within one architecture the levels go from slowest to fastest, and a CPU
/// supporting one supports all before it; `Scalar` runs everywhere.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    Scalar,
    Avx2,
    Avx512,
    Neon,
    Dotprod,
}

impl SimdLevel {
    pub const ALL: [SimdLevel; 5] = [
        Self::Scalar,
        Self::Avx2,
        Self::Avx512,
        Self::Neon,
        Self::Dotprod,
    ];

    /// The name used by `SAMPLER_SDK_SIMD` and reported by [`simd_level`].
    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
            Self::Neon => "neon",
            Self::Dotprod => "dotprod",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.name() == name)
    }

    /// The best level this CPU can run.
    pub fn detected() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if Avx512Checked::new().is_some() {
                return Self::Avx512;
            }
            if Avx2Checked::new().is_some() {
                return Self::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if ArmChecked::dotprod().is_some() {
                return Self::Dotprod;
            }
            return Self::Neon;
        }
        #[allow(unreachable_code)]
        Self::Scalar
    }

    /// The instruction-set family whose levels are ordered among themselves.
    fn family(self) -> u8 {
        match self {
            Self::Scalar => 0,
            Self::Avx2 | Self::Avx512 => 1,
            Self::Neon | Self::Dotprod => 2,
        }
    }

    /// Whether a CPU whose best level is `best` can run this level's kernels.
    pub fn runs_on(self, best: SimdLevel) -> bool {
        self == Self::Scalar || (self.family() == best.family() && self <= best)
    }

    /// Whether this CPU can run the level's kernels.
    pub fn is_supported(self) -> bool {
        self.runs_on(Self::detected())
    }
}

/// Proof that the CPU runs AVX2, FMA and F16C: the only way to obtain one is [`Self::new`],
/// which asks the CPU, and the AVX2 kernels can only be installed by presenting one.
#[cfg(target_arch = "x86_64")]
#[derive(Copy, Clone, Debug)]
pub(super) struct Avx2Checked(());

#[cfg(target_arch = "x86_64")]
impl Avx2Checked {
    pub(super) fn new() -> Option<Self> {
        let ok = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        ok.then_some(Self(()))
    }
}

/// Proof that the CPU runs everything [`Avx2Checked`] covers plus AVX-512 F, BW, VL and VNNI.
#[cfg(target_arch = "x86_64")]
#[derive(Copy, Clone, Debug)]
pub(super) struct Avx512Checked(());

#[cfg(target_arch = "x86_64")]
impl Avx512Checked {
    pub(super) fn new() -> Option<Self> {
        let ok = Avx2Checked::new().is_some()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        ok.then_some(Self(()))
    }

    /// Every AVX-512 CPU this level accepts also has the AVX2 set.
    pub(super) fn avx2(self) -> Avx2Checked {
        Avx2Checked(())
    }
}

/// Proof that the CPU is an AArch64 one (NEON is part of the architecture), and whether it
/// has the dot-product extension; the Arm kernels can only be installed by presenting one.
#[cfg(target_arch = "aarch64")]
#[derive(Copy, Clone, Debug)]
pub(super) struct ArmChecked {
    dotprod: bool,
}

#[cfg(target_arch = "aarch64")]
impl ArmChecked {
    /// For the `neon` level, which every AArch64 CPU runs.
    pub(super) fn neon() -> Self {
        Self { dotprod: false }
    }

    /// For the `dotprod` level; `None` when the CPU lacks `sdot`.
    pub(super) fn dotprod() -> Option<Self> {
        std::arch::is_aarch64_feature_detected!("dotprod").then_some(Self { dotprod: true })
    }

    pub(super) fn has_dotprod(self) -> bool {
        self.dotprod
    }
}

/// One level's kernels, indexed by weight type.
pub struct Kernels {
    level: SimdLevel,
    dot: [DotFn; GgmlType::ALL.len()],
    dot4: [Dot4Fn; GgmlType::ALL.len()],
    dot_tokens: [DotTokensFn; GgmlType::ALL.len()],
    dot_batch: [DotBatchFn; GgmlType::ALL.len()],
    dot_lanes: [Option<DotLanesFn>; GgmlType::ALL.len()],
    pub(super) quantize_q8_0: QuantizeFn,
    pub(super) quantize_q8_1: QuantizeFn,
    pub(super) quantize_q8_k: QuantizeFn,
    /// f32 -> f16 activations (round to nearest even), as little-endian bytes.
    pub(super) convert_f16: QuantizeFn,
}

/// Position of `ty` in [`GgmlType::ALL`] (the declaration order).
fn slot(ty: GgmlType) -> usize {
    ty as usize
}

/// A four-row kernel. Every level's four-row kernels return exactly the bits of four
/// single-row calls, so a row's value never depends on which rows it was computed with
/// (and so not on how a matmul splits rows across threads).
pub(super) trait FourRows {
    fn four(rows: [&[u8]; 4], act: &[u8], n: usize) -> [f32; 4];
}

/// [`DotTokensFn`] as one `K::four` call per token: for the kernels without a form that
/// shares the weight unpacking across tokens.
pub(super) fn tokens_one_by_one<K: FourRows>(
    rows: [&[u8]; 4],
    acts: &[QuantizedActivations],
    out: &mut [[f32; 4]],
) {
    let n = acts.first().map_or(0, QuantizedActivations::len);
    for (act, o) in acts.iter().zip(out) {
        *o = K::four(rows, act.bytes(), n);
    }
}

/// [`DotBatchFn`] that rounds a batch as its tokens one by one, for the kernels whose
/// llama.cpp counterpart does the same (or whose batch arithmetic is not reproduced).
pub(super) fn batch_one_by_one<K: FourRows>(
    rows: [&[u8]; 4],
    acts: &[QuantizedActivations],
    _first: usize,
    _batch: usize,
    out: &mut [[f32; 4]],
) {
    tokens_one_by_one::<K>(rows, acts, out);
}

/// The scalar level's kernels for type `ALL[T]`: four single-row calls.
struct ScalarRows<const T: usize>;

impl<const T: usize> FourRows for ScalarRows<T> {
    fn four(rows: [&[u8]; 4], act: &[u8], n: usize) -> [f32; 4] {
        let dot = scalar_kernel(GgmlType::ALL[T]);
        rows.map(|row| dot(row, act, n))
    }
}

impl Kernels {
    fn scalar() -> Self {
        let dot_tokens: [DotTokensFn; GgmlType::ALL.len()] = [
            tokens_one_by_one::<ScalarRows<0>>,
            tokens_one_by_one::<ScalarRows<1>>,
            tokens_one_by_one::<ScalarRows<2>>,
            tokens_one_by_one::<ScalarRows<3>>,
            tokens_one_by_one::<ScalarRows<4>>,
            tokens_one_by_one::<ScalarRows<5>>,
            tokens_one_by_one::<ScalarRows<6>>,
            tokens_one_by_one::<ScalarRows<7>>,
            tokens_one_by_one::<ScalarRows<8>>,
            tokens_one_by_one::<ScalarRows<9>>,
            tokens_one_by_one::<ScalarRows<10>>,
            tokens_one_by_one::<ScalarRows<11>>,
            tokens_one_by_one::<ScalarRows<12>>,
            tokens_one_by_one::<ScalarRows<13>>,
            tokens_one_by_one::<ScalarRows<14>>,
        ];
        Self {
            level: SimdLevel::Scalar,
            dot: GgmlType::ALL.map(scalar_kernel),
            dot4: [
                ScalarRows::<0>::four,
                ScalarRows::<1>::four,
                ScalarRows::<2>::four,
                ScalarRows::<3>::four,
                ScalarRows::<4>::four,
                ScalarRows::<5>::four,
                ScalarRows::<6>::four,
                ScalarRows::<7>::four,
                ScalarRows::<8>::four,
                ScalarRows::<9>::four,
                ScalarRows::<10>::four,
                ScalarRows::<11>::four,
                ScalarRows::<12>::four,
                ScalarRows::<13>::four,
                ScalarRows::<14>::four,
            ],
            dot_tokens,
            dot_batch: [
                batch_one_by_one::<ScalarRows<0>>,
                batch_one_by_one::<ScalarRows<1>>,
                batch_one_by_one::<ScalarRows<2>>,
                batch_one_by_one::<ScalarRows<3>>,
                batch_one_by_one::<ScalarRows<4>>,
                batch_one_by_one::<ScalarRows<5>>,
                batch_one_by_one::<ScalarRows<6>>,
                batch_one_by_one::<ScalarRows<7>>,
                batch_one_by_one::<ScalarRows<8>>,
                batch_one_by_one::<ScalarRows<9>>,
                batch_one_by_one::<ScalarRows<10>>,
                batch_one_by_one::<ScalarRows<11>>,
                batch_one_by_one::<ScalarRows<12>>,
                batch_one_by_one::<ScalarRows<13>>,
                batch_one_by_one::<ScalarRows<14>>,
            ],
            dot_lanes: [None; GgmlType::ALL.len()],
            quantize_q8_0: activation::quantize_q8_0,
            quantize_q8_1: activation::quantize_q8_1,
            quantize_q8_k: activation::quantize_q8_k,
            convert_f16: activation::convert_f16,
        }
    }

    /// The table for `level`; `None` when this CPU cannot run it.
    fn build(level: SimdLevel) -> Option<Self> {
        let mut table = Self::scalar();
        table.level = level;
        match level {
            SimdLevel::Scalar => {}
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => super::dot_avx2::install(&mut table, Avx2Checked::new()?),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => {
                let proof = Avx512Checked::new()?;
                super::dot_avx2::install(&mut table, proof.avx2());
                super::dot_avx512::install(&mut table, proof);
            }
            #[cfg(not(target_arch = "x86_64"))]
            SimdLevel::Avx2 | SimdLevel::Avx512 => return None,
            #[cfg(target_arch = "aarch64")]
            SimdLevel::Neon => super::dot_neon::install(&mut table, ArmChecked::neon()),
            #[cfg(target_arch = "aarch64")]
            SimdLevel::Dotprod => super::dot_neon::install(&mut table, ArmChecked::dotprod()?),
            #[cfg(not(target_arch = "aarch64"))]
            SimdLevel::Neon | SimdLevel::Dotprod => return None,
        }
        Some(table)
    }

    pub fn level(&self) -> SimdLevel {
        self.level
    }

    /// The dot product of weight rows of type `ty` with activations in `activation_type(ty)`.
    pub fn dot(&self, ty: GgmlType) -> DotFn {
        self.dot[slot(ty)]
    }

    /// Four weight rows against one activation row; bit-identical to four [`Self::dot`] calls.
    pub fn dot4(&self, ty: GgmlType) -> Dot4Fn {
        self.dot4[slot(ty)]
    }

    /// Four weight rows against several tokens' activations; bit-identical to
    /// [`Self::dot`] calls (see [`DotTokensFn`]).
    pub fn dot_tokens(&self, ty: GgmlType) -> DotTokensFn {
        self.dot_tokens[slot(ty)]
    }

    /// Four weight rows against some tokens of a batch, with llama.cpp's arithmetic for that
    /// batch (see [`DotBatchFn`]).
    pub fn dot_batch(&self, ty: GgmlType) -> DotBatchFn {
        self.dot_batch[slot(ty)]
    }

    /// Two weight rows against the tokens of a [`TokenLanes`](super::TokenLanes), for the
    /// types and levels that have such a kernel (AVX-512: Q4_0, Q5_0, Q8_0); bit-identical
    /// to [`Self::dot`] calls.
    pub fn dot_lanes(&self, ty: GgmlType) -> Option<DotLanesFn> {
        self.dot_lanes[slot(ty)]
    }

    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) fn set_dot_lanes(&mut self, ty: GgmlType, lanes: DotLanesFn) {
        self.dot_lanes[slot(ty)] = Some(lanes);
    }

    #[cfg_attr(
        not(any(target_arch = "x86_64", target_arch = "aarch64")),
        allow(dead_code)
    )]
    pub(super) fn set_dot(
        &mut self,
        ty: GgmlType,
        single: DotFn,
        four: Dot4Fn,
        tokens: DotTokensFn,
        batch: DotBatchFn,
    ) {
        self.dot[slot(ty)] = single;
        self.dot4[slot(ty)] = four;
        self.dot_tokens[slot(ty)] = tokens;
        self.dot_batch[slot(ty)] = batch;
    }

    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) fn set_dot_tokens(&mut self, ty: GgmlType, tokens: DotTokensFn, batch: DotBatchFn) {
        self.dot_tokens[slot(ty)] = tokens;
        self.dot_batch[slot(ty)] = batch;
    }
}

fn scalar_kernel(ty: GgmlType) -> DotFn {
    match ty {
        GgmlType::F32 => scalar::dot_f32_f32,
        GgmlType::F16 => scalar::dot_f16_f16,
        GgmlType::BF16 => scalar::dot_bf16_bf16,
        GgmlType::Q4_0 => scalar::dot_q4_0_q8_0,
        GgmlType::Q4_1 => scalar::dot_q4_1_q8_1,
        GgmlType::Q5_0 => scalar::dot_q5_0_q8_0,
        GgmlType::Q5_1 => scalar::dot_q5_1_q8_1,
        GgmlType::Q8_0 => scalar::dot_q8_0_q8_0,
        GgmlType::Q8_1 => scalar::dot_q8_1_q8_1,
        GgmlType::Q2K => scalar::dot_q2_k_q8_k,
        GgmlType::Q3K => scalar::dot_q3_k_q8_k,
        GgmlType::Q4K => scalar::dot_q4_k_q8_k,
        GgmlType::Q5K => scalar::dot_q5_k_q8_k,
        GgmlType::Q6K => scalar::dot_q6_k_q8_k,
        GgmlType::Q8K => scalar::dot_q8_k_q8_k,
    }
}

/// The level to use given the `SAMPLER_SDK_SIMD` value and the best level the CPU runs,
/// with a warning when the request cannot be honoured.
fn choose(requested: Option<&str>, best: SimdLevel) -> (SimdLevel, Option<String>) {
    let requested = match requested.map(str::trim) {
        None | Some("") | Some("auto") => return (best, None),
        Some(name) => name,
    };
    match SimdLevel::from_name(requested) {
        Some(level) if level.runs_on(best) => (level, None),
        Some(level) => (
            best,
            Some(format!(
                "{SIMD_ENV}={requested}: this CPU lacks the {} instructions; using {}",
                level.name(),
                best.name()
            )),
        ),
        None => (
            best,
            Some(format!(
                "{SIMD_ENV}={requested} is not one of scalar, avx2, avx512, neon, dotprod (or auto); using {}",
                best.name()
            )),
        ),
    }
}

/// The kernels of `level`, built on first use; `None` when this CPU cannot run them.
pub fn kernels_for(level: SimdLevel) -> Option<&'static Kernels> {
    static TABLES: [OnceLock<Option<Kernels>>; SimdLevel::ALL.len()] =
        [const { OnceLock::new() }; SimdLevel::ALL.len()];
    TABLES[level as usize]
        .get_or_init(|| Kernels::build(level))
        .as_ref()
}

/// The kernels this process uses: the best level the CPU runs, or the one
/// `SAMPLER_SDK_SIMD` asks for. Chosen once, on first use.
pub fn kernels() -> &'static Kernels {
    static CHOSEN: OnceLock<&'static Kernels> = OnceLock::new();
    CHOSEN.get_or_init(|| {
        let requested = std::env::var(SIMD_ENV).ok();
        let (level, warning) = choose(requested.as_deref(), SimdLevel::detected());
        if let Some(warning) = warning {
            log::warn!("{warning}");
        }
        match kernels_for(level) {
            Some(table) => table,
            // Unreachable: `choose` only returns supported levels, and scalar always builds.
            None => scalar_table(),
        }
    })
}

fn scalar_table() -> &'static Kernels {
    static SCALAR: OnceLock<Kernels> = OnceLock::new();
    SCALAR.get_or_init(Kernels::scalar)
}

/// The kernel set in use: `"scalar"`, `"avx2"`, `"avx512"` (AVX-512 with VNNI), `"neon"`
/// or `"dotprod"` (NEON with `sdot`).
pub fn simd_level() -> &'static str {
    kernels().level.name()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_type_list() {
        for (i, ty) in GgmlType::ALL.into_iter().enumerate() {
            assert_eq!(slot(ty), i, "{ty}");
        }
    }

    #[test]
    fn requests_are_honoured_only_when_the_cpu_can() {
        use SimdLevel::*;
        assert_eq!(choose(None, Avx512), (Avx512, None));
        assert_eq!(choose(Some("auto"), Avx2), (Avx2, None));
        assert_eq!(choose(Some("scalar"), Avx512), (Scalar, None));
        assert_eq!(choose(Some(" avx2 "), Avx512), (Avx2, None));
        assert_eq!(choose(Some("avx512"), Avx512), (Avx512, None));
        let (level, warning) = choose(Some("avx512"), Avx2);
        assert_eq!(level, Avx2);
        assert_eq!(
            warning.as_deref(),
            Some("SAMPLER_SDK_SIMD=avx512: this CPU lacks the avx512 instructions; using avx2")
        );
        let (level, warning) = choose(Some("sve"), Scalar);
        assert_eq!(level, Scalar);
        assert!(warning.is_some_and(|w| w.contains("not one of")));
        assert_eq!(choose(Some("neon"), Dotprod), (Neon, None));
        assert_eq!(choose(Some("scalar"), Dotprod), (Scalar, None));
        let (level, warning) = choose(Some("avx2"), Dotprod);
        assert_eq!(level, Dotprod);
        assert!(warning.is_some_and(|w| w.contains("lacks the avx2")));
        let (level, _) = choose(Some("dotprod"), Avx512);
        assert_eq!(level, Avx512);
    }

    #[test]
    fn every_supported_level_builds_and_reports_itself() {
        for level in SimdLevel::ALL {
            let table = kernels_for(level);
            assert_eq!(table.is_some(), level.is_supported(), "{level:?}");
            if let Some(table) = table {
                assert_eq!(table.level(), level);
            }
        }
        assert!(SimdLevel::Scalar.is_supported());
    }

    /// Run in a child process by `environment_override_is_honoured`, with the variable set.
    #[test]
    #[ignore = "run by environment_override_is_honoured in a child process"]
    fn child_reports_requested_level() {
        // Run directly (`cargo test -- --ignored`) without the variable, there is nothing to check.
        if let Ok(requested) = std::env::var(SIMD_ENV) {
            assert_eq!(simd_level(), requested);
        }
    }

    #[test]
    fn environment_override_is_honoured() {
        let Ok(exe) = std::env::current_exe() else {
            panic!("cannot locate the test binary to rerun it");
        };
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_supported()) {
            let status = std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "quant::dispatch::tests::child_reports_requested_level",
                    "--ignored",
                    "--quiet",
                ])
                .env(SIMD_ENV, level.name())
                .stdout(std::process::Stdio::null())
                .status();
            assert!(
                status.as_ref().is_ok_and(|s| s.success()),
                "{SIMD_ENV}={} not honoured: {status:?}",
                level.name()
            );
        }
    }
}
