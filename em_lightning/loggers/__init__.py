"""Lightning layer: the run logger (the one way metrics reach TensorBoard/CSV/W&B), logger internals, the TensorBoard layout."""
