//! The scenarios, run in the order `main` lists them against one private containerd.

pub mod basics;
pub mod cleanup;
pub mod cri;
pub mod exec;
pub mod podnet;
pub mod pods;
pub mod volumes;
