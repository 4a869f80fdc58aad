"""Lightning layer: the LightningModule, the DataModule, the FSDP2 strategy and the callbacks' event channel."""
