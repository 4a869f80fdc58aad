"""Base layer: rows -> chat-templated, masked examples -> seeded resumable order; the loss, the LR schedule, non-finite checks."""
