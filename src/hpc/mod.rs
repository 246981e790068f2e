//! Where steps run. [`local`] runs them as detached child processes on this machine; the SSH
//! backend for a separate GPU server arrives with its own issue.

pub mod local;
