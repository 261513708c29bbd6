//! Whole greedy generations against llama.cpp's Arm builds:
//! `tests/golden/arm_generation.txt` holds, per step, the argmax and an FNV-1a hash of
//! every logit's bits that llama.cpp printed, cross-built with GCC for `armv8-a` and
//! `armv8.2-a+dotprod` and run under qemu (`tests/scripts/arm_kernels/
//! make_generation_golden.sh`). On AArch64 the cases of the active kernel level's build
//! run here (`neon` -> armv8-a, `dotprod` -> armv8.2-a+dotprod; `SAMPLER_SDK_SIMD=neon`
//! selects the first on a CPU with the dot product), and every step must match.

#![allow(clippy::expect_used, clippy::unwrap_used)]

/// One generation of the golden file.
struct Case {
    model: (String, String),
    arch: String,
    decoded: usize,
    prompt: Vec<u32>,
    /// `(argmax, hash)` per step, the prompt's logits first.
    steps: Vec<(u32, u64)>,
}

fn cases() -> Vec<Case> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/arm_generation.txt"
    );
    let text = std::fs::read_to_string(path).expect("golden file");
    let mut cases: Vec<Case> = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split(' ').collect();
        match f[0] {
            "case" => cases.push(Case {
                model: (f[1].to_string(), f[2].to_string()),
                arch: f[3].to_string(),
                decoded: f[4].parse().unwrap(),
                prompt: f[5].split(',').map(|t| t.parse().unwrap()).collect(),
                steps: Vec::new(),
            }),
            "step" => {
                let case = cases.last_mut().expect("a case before its steps");
                assert_eq!(f[1].parse::<usize>().unwrap(), case.steps.len(), "{line}");
                let hash = u64::from_str_radix(f[5], 16).unwrap();
                case.steps.push((f[3].parse().unwrap(), hash));
            }
            other => panic!("unknown record {other}"),
        }
    }
    cases
}

#[test]
fn golden_generations_are_complete() {
    let cases = cases();
    assert!(cases.len() >= 3);
    for case in &cases {
        assert_eq!(case.steps.len(), case.decoded + 1, "{}", case.model.0);
        assert!(!case.prompt.is_empty());
        assert!(["armv8-a", "armv8.2-a+dotprod"].contains(&case.arch.as_str()));
    }
}

#[cfg(target_arch = "aarch64")]
#[test]
fn generations_equal_llama_cpp_arm_builds() {
    use crate::model::trace::logits_fingerprint as step_of;
    use crate::model::Model;
    let arch = match crate::quant::simd_level() {
        "neon" => "armv8-a",
        "dotprod" => "armv8.2-a+dotprod",
        other => {
            eprintln!("skipped: the {other} level has no Arm llama.cpp build to compare with");
            return;
        }
    };
    for case in cases().into_iter().filter(|c| c.arch == arch) {
        let (name, file) = (&case.model.0, &case.model.1);
        let Some(path) = crate::test_models::path((name, file)) else {
            continue;
        };
        let model = Model::load_with_threads(&path, 2).unwrap();
        let mut seq = model.new_sequence(512);
        let mut got = vec![step_of(&model.prefill(&mut seq, &case.prompt, 1).unwrap())];
        while got.len() < case.steps.len() {
            let next = got.last().unwrap().0;
            got.push(step_of(&model.forward(&mut seq, &[next], 1).unwrap()));
        }
        for (step, (g, w)) in got.iter().zip(&case.steps).enumerate() {
            assert_eq!(g, w, "{name} at {arch}: step {step} (argmax, logits hash)");
        }
    }
}
