//! CPU time read at two instants, so that the benchmark can say what a
//! write cost each side in CPU, not only in wall-clock time: which of the
//! threads and processes its time goes to.

use std::path::PathBuf;

use anyhow::Context;
use nix::sys::resource::{getrusage, Usage, UsageWho};
use nix::sys::time::TimeVal;
use nix::unistd::{sysconf, SysconfVar};

/// CPU time used up to one instant, in µs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// The calling thread in user mode.
    pub thread_user_us: u64,
    /// The calling thread in the kernel.
    pub thread_system_us: u64,
    /// Every thread of this process, the calling one included, user and
    /// kernel: io_uring's worker threads count here, as do threads that
    /// have exited.
    pub process_us: u64,
    /// The watched processes (a volume's secondaries), user and kernel,
    /// summed; at the resolution of their clock ticks.
    pub watched_us: u64,
}

impl CpuTimes {
    /// What was used from `earlier` to `self`.
    pub fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            thread_user_us: self.thread_user_us.saturating_sub(earlier.thread_user_us),
            thread_system_us: self
                .thread_system_us
                .saturating_sub(earlier.thread_system_us),
            process_us: self.process_us.saturating_sub(earlier.process_us),
            watched_us: self.watched_us.saturating_sub(earlier.watched_us),
        }
    }
}

/// Reads [`CpuTimes`] for the calling thread, its process and a set of
/// other processes.
pub struct CpuProbe {
    watched_stat_paths: Vec<PathBuf>,
    us_per_tick: u64,
}

impl CpuProbe {
    /// A probe that also sums the processes `watched_pids`.
    pub fn new(watched_pids: &[u32]) -> anyhow::Result<CpuProbe> {
        let ticks_per_s = sysconf(SysconfVar::CLK_TCK)
            .context("asking for the clock ticks per second")?
            .filter(|&ticks| ticks > 0)
            .context("the system reports no clock tick rate")?;
        Ok(CpuProbe {
            watched_stat_paths: watched_pids
                .iter()
                .map(|pid| PathBuf::from(format!("/proc/{pid}/stat")))
                .collect(),
            us_per_tick: 1_000_000 / ticks_per_s as u64,
        })
    }

    /// The CPU time used so far. Must be called on the thread whose own
    /// time is wanted.
    pub fn read(&self) -> anyhow::Result<CpuTimes> {
        let thread = getrusage(UsageWho::RUSAGE_THREAD).context("getrusage of the thread")?;
        let process = getrusage(UsageWho::RUSAGE_SELF).context("getrusage of the process")?;
        let mut watched_ticks = 0;
        for path in &self.watched_stat_paths {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            watched_ticks += cpu_ticks_of_stat(&text)
                .with_context(|| format!("{}: no utime and stime fields", path.display()))?;
        }
        Ok(CpuTimes {
            thread_user_us: micros(thread.user_time()),
            thread_system_us: micros(thread.system_time()),
            process_us: total_micros(&process),
            watched_us: watched_ticks * self.us_per_tick,
        })
    }
}

fn micros(time: TimeVal) -> u64 {
    let micros = time.tv_sec() * 1_000_000 + time.tv_usec();
    u64::try_from(micros).unwrap_or(0)
}

fn total_micros(usage: &Usage) -> u64 {
    micros(usage.user_time()) + micros(usage.system_time())
}

/// utime + stime, in clock ticks, from the text of `/proc/<pid>/stat`:
/// fields 14 and 15, counted after the command name, which is in
/// parentheses and may itself hold spaces and parentheses.
fn cpu_ticks_of_stat(text: &str) -> Option<u64> {
    let after_name = &text[text.rfind(')')? + 1..];
    // After the name come field 3 (state) onwards.
    let mut fields = after_name.split_whitespace().skip(14 - 3);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_found_after_a_name_with_spaces_and_parentheses() {
        let text = "4242 (replblkd (x) y) S 1 4242 4242 0 -1 4194560 123 0 0 0 \
                    57 31 0 0 20 0 3 0 100 1000 10 18446744073709551615";
        assert_eq!(cpu_ticks_of_stat(text), Some(57 + 31));
        assert_eq!(cpu_ticks_of_stat("4242 (cut) S 1 2"), None);
    }

    #[test]
    fn the_calling_threads_work_shows_in_its_own_and_its_process_time() {
        let probe = CpuProbe::new(&[std::process::id()]).expect("probe");
        let before = probe.read().expect("read");
        let thread_us = |times: &CpuTimes| times.thread_user_us + times.thread_system_us;
        // Spin until the thread has used 100 ms of CPU; on a loaded
        // machine that takes longer, but not 10 s.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut x = 1u64;
        let used = loop {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            let used = probe.read().expect("read").since(&before);
            if thread_us(&used) >= 100_000 || std::time::Instant::now() > deadline {
                break used;
            }
        };
        assert!(thread_us(&used) >= 100_000, "{used:?}");
        assert!(used.process_us + 1_000 >= thread_us(&used), "{used:?}");
        // The watched process is this one, counted in 10 ms ticks.
        assert!(used.watched_us >= 50_000, "{used:?}");
    }
}
