//! What the primary's core costs per write, alone: a 0-secondary volume
//! at queue depth 32, writes of 4 KiB at random offsets, driven straight
//! through [`replblk::core::primary::Primary`] with no ring, socket or
//! clock. The local writes finish in the order they started (`fifo`, as
//! on the test VM's tmpfs, where io_uring writes a file's blocks one at a
//! time) or in random order (`random`, as a disk with many queues may).
//!
//! Run under callgrind, which counts instructions, not seconds: the count
//! is the same run after run, whatever else the machine does, so a change
//! to the core shows in instructions per write exactly.
//!
//! ```text
//! cargo build --release -p replblk-tools --example core_cost
//! valgrind --tool=callgrind --callgrind-out-file=core.cg \
//!     target/release/examples/core_cost 100000 fifo
//! callgrind_annotate core.cg | head -30
//! ```
//!
//! The total over the argument (writes) is the core's instructions per
//! write plus this driver's own, about 130 (its random numbers, its action
//! loop, and in `fifo` order the shift of its list of writes in flight),
//! which stay the same from one build of the core to the next. The engine
//! around the core, its ring and the ublk queue cost more again; see
//! docs/BENCHMARKS.md for the whole write.

use std::sync::Arc;

use anyhow::{bail, Context};
use replblk::core::primary::{Action, Geometry, Primary, PrimaryLimits};

/// Writes in flight at once, as fio's depth-32 job keeps them.
const DEPTH: usize = 32;
const BLOCK_BYTES: u64 = 4096;
const VOLUME_BYTES: u64 = 256 << 20;

/// Takes the core's actions; returns the writes completed.
fn drain(core: &mut Primary<Arc<[u8]>>, writing: &mut Vec<u64>) -> anyhow::Result<u64> {
    let mut completed = 0;
    while let Some(action) = core.poll_action() {
        match action {
            Action::LocalWrite { seq, .. } => writing.push(seq),
            Action::Complete { result: Ok(()), .. } => completed += 1,
            other => bail!("a 0-secondary volume asked for {other:?}"),
        }
    }
    Ok(completed)
}

fn main() -> anyhow::Result<()> {
    let writes: u64 = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse()
            .context("the first argument is a number of writes")?,
        None => 100_000,
    };
    let in_random_order = match std::env::args().nth(2).as_deref() {
        None | Some("fifo") => false,
        Some("random") => true,
        Some(other) => bail!("the second argument is fifo or random, not {other}"),
    };
    let limits = PrimaryLimits {
        window_updates_max: 1024,
        window_bytes_max: 128 << 20,
        all_acked_delay_ms: 10,
        member_timeout_ms: 10_000,
        ack_timeout_ms: 5_000,
    };
    let geometry = Geometry {
        volume_size_bytes: VOLUME_BYTES,
        block_size_bytes: BLOCK_BYTES as u32,
        write_max_bytes: 1 << 20,
    };
    let mut core: Primary<Arc<[u8]>> = Primary::new(limits, geometry, &[], 1, 1, 0);
    let payload: Arc<[u8]> = vec![0_u8; BLOCK_BYTES as usize].into();
    // xorshift64: the same offsets and completion order every run.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut writing: Vec<u64> = Vec::with_capacity(DEPTH);
    let (mut submitted, mut completed, mut now_ms) = (0_u64, 0_u64, 0_u64);
    while completed < writes {
        while writing.len() < DEPTH && submitted < writes {
            submitted += 1;
            let offset_bytes = random() % (VOLUME_BYTES / BLOCK_BYTES) * BLOCK_BYTES;
            core.submit_write(
                submitted,
                offset_bytes,
                BLOCK_BYTES as u32,
                false,
                payload.clone(),
                now_ms,
            )?;
            completed += drain(&mut core, &mut writing)?;
        }
        if writing.is_empty() {
            bail!("{completed} of {writes} writes completed and none is being written");
        }
        let seq = if in_random_order {
            writing.swap_remove((random() % writing.len() as u64) as usize)
        } else {
            writing.remove(0)
        };
        now_ms += 1;
        core.local_write_done(seq, Ok(()), now_ms);
        completed += drain(&mut core, &mut writing)?;
    }
    println!("{completed} writes completed");
    Ok(())
}
