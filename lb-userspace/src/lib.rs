//! The controller's library: load the XDP objects, write their maps, build
//! Maglev rings, and keep the VIP/backend model that drives them.

pub mod addr;
pub mod announce;
pub mod api;
mod check_tasks;
pub mod controller;
pub mod dataplane;
pub mod decap_cmd;
pub mod desired;
pub mod health;
pub mod lab_trunk;
pub mod maglev;
pub mod metrics;
pub mod netlink;
pub mod nic;
pub mod object;
pub mod offload_check;
pub mod probe_path;
pub mod quic;
pub mod rings;
pub mod services;
pub mod state_file;
mod sys;
pub mod up;
pub mod vlan;

pub use dataplane::{Dataplane, DataplaneError, Decap, LoadOptions};
pub use services::{BackendSpec, HashMode, Proto, ServiceError, Services, Settings, VipSpec};
