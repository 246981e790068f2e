//! Where steps run. [`local`] runs them as detached child processes on this machine;
//! [`ssh`] reaches a separate GPU server (one reused SSH session per host, host keys checked),
//! and [`remote`] runs steps there, detached, the same way.

pub mod local;
pub mod remote;
pub mod ssh;
