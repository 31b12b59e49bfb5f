//! Examples of embedding ratelimit-core; see `examples/`.
