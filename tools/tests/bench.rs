//! `replblk-bench` end to end: every workload measured on the local file and
//! on volumes with 0 and 1 secondaries, from either caller (the engine's
//! thread, the benchmark's own). The figures themselves are the machine's
//! business; what must hold is that the tool produces all of them.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest a short run may take (it needs about 20 s on a 2-core machine).
const BENCH_TIMEOUT: Duration = Duration::from_secs(180);

const WORKLOADS: [&str; 3] = [
    "4 KiB random write, QD1",
    "4 KiB random write, QD32",
    "1 MiB sequential write, QD4",
];

/// Runs the benchmark for 1 s per workload with `extra` arguments and
/// returns its standard output.
fn run_bench(caller: &str, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut child = Command::new(env!("CARGO_BIN_EXE_replblk-bench"))
        .args(["--seconds", "1", "--secondaries", "0,1", "--log-mib", "16"])
        .args(["--caller", caller])
        .args(extra)
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("replblk-bench starts");
    let deadline = Instant::now() + BENCH_TIMEOUT;
    while child
        .try_wait()
        .expect("waiting for replblk-bench")
        .is_none()
    {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("replblk-bench --caller {caller} did not finish within {BENCH_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().expect("replblk-bench's output");
    assert!(
        output.status.success(),
        "replblk-bench --caller {caller} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("the table is text")
}

/// The IOPS the table gives `target` for `workload`.
fn iops(table: &str, workload: &str, target: &str) -> f64 {
    table
        .lines()
        .filter_map(|line| line.strip_prefix(workload))
        .map(|rest| rest.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&target))
        .and_then(|fields| fields.get(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no row for {target} in {workload}:\n{table}"))
}

/// The CPU per write the report gives `target` for `workload`: the
/// workload's thread (user + kernel), the process's other threads, the
/// secondaries.
fn cpu_per_write(table: &str, workload: &str, target: &str) -> (f64, f64, f64) {
    let prefix = format!("{target} {workload}: ");
    let parse = |text: &str| text.trim().parse::<f64>().ok();
    table
        .lines()
        .find_map(|line| {
            let rest = line.trim().strip_prefix(&prefix)?;
            let (figures, _total) = rest.split_once(" (total ")?;
            let mut parts = figures.split(';');
            let (user, kernel) = parts.next()?.split_once('+')?;
            let thread = parse(user)? + parse(kernel)?;
            Some((thread, parse(parts.next()?)?, parse(parts.next()?)?))
        })
        .unwrap_or_else(|| panic!("no CPU line for {target} in {workload}:\n{table}"))
}

#[test]
fn every_workload_is_measured_on_every_volume_from_either_caller() {
    // The second run also fills the secondaries' copies first.
    for (caller, extra) in [
        ("engine", &[][..]),
        ("thread", &["--prefill", "secondaries"][..]),
    ] {
        let table = run_bench(caller, extra);
        for workload in WORKLOADS {
            for target in ["local", "replblk-0", "replblk-1"] {
                let measured = iops(&table, workload, target);
                assert!(
                    measured > 0.0,
                    "{target} completed no write in {workload} (--caller {caller})"
                );
                let (thread_us, _, secondaries_us) = cpu_per_write(&table, workload, target);
                assert!(
                    thread_us > 0.0,
                    "{target} in {workload}: the workload's thread used no CPU (--caller {caller})"
                );
                // Only the volume with a secondary has one whose CPU counts.
                assert_eq!(
                    secondaries_us > 0.0,
                    target == "replblk-1",
                    "{target} in {workload}: secondaries' CPU {secondaries_us} µs per write (--caller {caller})"
                );
            }
        }
    }
}
