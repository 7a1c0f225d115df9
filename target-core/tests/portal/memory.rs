//! Memory bounds on write data.
