//! The long-lived thread pool (in progress).
