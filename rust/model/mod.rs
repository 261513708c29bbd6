//! Model hyperparameters, weights, forward pass.
