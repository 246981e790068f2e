//! Where steps run. [`local`] runs them as detached child processes on this machine;
//! [`ssh`] reaches a separate GPU server (one reused SSH session per host, host keys checked).

pub mod local;
pub mod ssh;
