//! Pieces shared by replblk's tools.

pub mod cpu_time;
