//! Dot-product kernels per weight type and SIMD level, single-threaded: one
//! matrix-vector product of a 576 x 1536 weight matrix (SmolLM2's `ffn_down` shape),
//! reported as GB/s of weight bytes. `rows1` calls the single-row kernel per row, `rows4`
//! the four-row kernel. `quantize` times activation quantisation of a 1536-vector.
//!
//! `stream` repeats the four-row product over a ~96 MB matrix (a small model's weights),
//! which no cache holds: the rate there is what DRAM delivers to one core.
//!
//! `cargo bench --bench quant_dot -- 'dot/Q4_1'` runs a subset.
//!
//! Times are the benchmark thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`) on Linux, not
//! wall time: on a shared machine the thread is descheduled for unpredictable stretches,
//! and CPU time does not count them. (This machine's VM exposes no hardware counters, so
//! `perf stat -e instructions` is not available for a steadier measure.)

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::{bf16, f16};
use sampler_sdk::quant::{kernels_for, GgmlType, Kernels, QuantizedActivations, SimdLevel};

const ROWS: usize = 576;
const COLS: usize = 1536;

/// CPU time of the calling thread, in nanoseconds; wall time where there is no such clock.
struct ThreadCpuTime;

#[cfg(target_os = "linux")]
fn thread_cpu_nanos() -> f64 {
    #[repr(C)]
    struct Timespec {
        seconds: i64,
        nanos: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, out: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut t = Timespec {
        seconds: 0,
        nanos: 0,
    };
    // SAFETY: `t` is a valid timespec (two i64 on 64-bit Linux) for the call to fill.
    let status = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(status, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    t.seconds as f64 * 1e9 + t.nanos as f64
}

#[cfg(not(target_os = "linux"))]
fn thread_cpu_nanos() -> f64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as f64
}

impl Measurement for ThreadCpuTime {
    type Intermediate = f64;
    type Value = f64;

    fn start(&self) -> f64 {
        thread_cpu_nanos()
    }
    fn end(&self, start: f64) -> f64 {
        thread_cpu_nanos() - start
    }
    fn add(&self, a: &f64, b: &f64) -> f64 {
        a + b
    }
    fn zero(&self) -> f64 {
        0.0
    }
    fn to_f64(&self, value: &f64) -> f64 {
        *value
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        // Values are nanoseconds, as wall time's are.
        static WALL: WallTime = WallTime;
        WALL.formatter()
    }
}

type Bench = Criterion<ThreadCpuTime>;

/// splitmix64: fixed data without a dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Random block bytes with finite scales (the offsets of each block's f16/f32 fields).
fn weight_matrix(ty: GgmlType, rows: usize, rng: &mut Rng) -> Vec<u8> {
    let row_bytes = ty.bytes_for(COLS as u64).unwrap_or(0) as usize;
    let mut bytes: Vec<u8> = (0..rows * row_bytes)
        .map(|_| rng.next_u64() as u8)
        .collect();
    let f16_fields: &[usize] = match ty {
        GgmlType::F32 => {
            for c in bytes.chunks_exact_mut(4) {
                c.copy_from_slice(&(0.1 * rng.unit()).to_le_bytes());
            }
            return bytes;
        }
        GgmlType::F16 => {
            for c in bytes.chunks_exact_mut(2) {
                c.copy_from_slice(&f16::from_f32(0.1 * rng.unit()).to_le_bytes());
            }
            return bytes;
        }
        GgmlType::BF16 => {
            for c in bytes.chunks_exact_mut(2) {
                c.copy_from_slice(&bf16::from_f32(0.1 * rng.unit()).to_le_bytes());
            }
            return bytes;
        }
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q2K => &[80, 82],
        GgmlType::Q3K => &[108],
        GgmlType::Q6K => &[208],
        GgmlType::Q8_1 | GgmlType::Q8K => &[],
    };
    for block in bytes.chunks_exact_mut(ty.type_size()) {
        for &at in f16_fields {
            block[at..at + 2].copy_from_slice(&f16::from_f32(0.01 * rng.unit()).to_le_bytes());
        }
    }
    bytes
}

/// The weight types of real models, in order of importance.
const TYPES: [GgmlType; 13] = [
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q5_0,
    GgmlType::Q4K,
    GgmlType::Q6K,
    GgmlType::Q5_1,
    GgmlType::Q5K,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::F32,
];

fn levels() -> Vec<&'static Kernels> {
    SimdLevel::ALL
        .iter()
        .filter_map(|&l| kernels_for(l))
        .collect()
}

fn matvec_rows1(k: &Kernels, ty: GgmlType, w: &[u8], act: &QuantizedActivations, out: &mut [f32]) {
    let dot = k.dot(ty);
    let row_bytes = w.len() / out.len();
    for (o, row) in out.iter_mut().zip(w.chunks_exact(row_bytes)) {
        *o = dot(row, act.bytes(), act.len());
    }
}

fn matvec_rows4(k: &Kernels, ty: GgmlType, w: &[u8], act: &QuantizedActivations, out: &mut [f32]) {
    let dot4 = k.dot4(ty);
    let row_bytes = w.len() / out.len();
    for (o, rows) in out.chunks_exact_mut(4).zip(w.chunks_exact(4 * row_bytes)) {
        let r = |i: usize| &rows[i * row_bytes..(i + 1) * row_bytes];
        o.copy_from_slice(&dot4([r(0), r(1), r(2), r(3)], act.bytes(), act.len()));
    }
}

fn bench_dot(c: &mut Bench) {
    let mut rng = Rng(1);
    let x: Vec<f32> = (0..COLS).map(|_| rng.unit()).collect();
    let mut out = vec![0f32; ROWS];
    for ty in TYPES {
        let w = weight_matrix(ty, ROWS, &mut rng);
        let mut group = c.benchmark_group(format!("dot/{ty}"));
        group.throughput(Throughput::Bytes(w.len() as u64));
        for k in levels() {
            let mut act = QuantizedActivations::new();
            if act.quantize_with(k, ty, &x).is_err() {
                continue;
            }
            let level = k.level().name();
            group.bench_function(format!("{level}/rows1"), |b| {
                b.iter(|| matvec_rows1(k, ty, black_box(&w), &act, &mut out));
            });
            group.bench_function(format!("{level}/rows4"), |b| {
                b.iter(|| matvec_rows4(k, ty, black_box(&w), &act, &mut out));
            });
        }
        group.finish();
    }
}

fn bench_stream(c: &mut Bench) {
    const BYTES: usize = 96 << 20;
    let mut rng = Rng(3);
    let x: Vec<f32> = (0..COLS).map(|_| rng.unit()).collect();
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q6K] {
        let row_bytes = ty.bytes_for(COLS as u64).unwrap_or(1) as usize;
        let rows = BYTES / row_bytes / 4 * 4;
        let w = weight_matrix(ty, rows, &mut rng);
        let mut out = vec![0f32; rows];
        let mut group = c.benchmark_group(format!("stream/{ty}"));
        group.throughput(Throughput::Bytes(w.len() as u64));
        group.sample_size(10);
        for k in levels().into_iter().skip(1) {
            let mut act = QuantizedActivations::new();
            if act.quantize_with(k, ty, &x).is_err() {
                continue;
            }
            group.bench_function(format!("{}/rows4", k.level().name()), |b| {
                b.iter(|| matvec_rows4(k, ty, black_box(&w), &act, &mut out));
            });
            group.bench_function(format!("{}/rows1", k.level().name()), |b| {
                b.iter(|| matvec_rows1(k, ty, black_box(&w), &act, &mut out));
            });
        }
        group.finish();
    }
}

fn bench_quantize(c: &mut Bench) {
    let mut rng = Rng(2);
    let x: Vec<f32> = (0..COLS).map(|_| rng.unit()).collect();
    for (format, weight) in [
        ("Q8_0", GgmlType::Q8_0),
        ("Q8_1", GgmlType::Q4_1),
        ("Q8_K", GgmlType::Q4K),
    ] {
        let mut group = c.benchmark_group(format!("quantize/{format}"));
        group.throughput(Throughput::Bytes(4 * COLS as u64));
        for k in levels() {
            let mut act = QuantizedActivations::new();
            group.bench_function(k.level().name(), |b| {
                b.iter(|| act.quantize_with(k, weight, black_box(&x)));
            });
        }
        group.finish();
    }
}

fn config() -> Bench {
    Criterion::default()
        .with_measurement(ThreadCpuTime)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_dot, bench_stream, bench_quantize
}
criterion_main!(benches);
