//! Training: models compiled for gradients ([`model`]).
pub mod model;
