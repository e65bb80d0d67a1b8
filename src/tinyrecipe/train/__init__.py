"""Training: the LightningModule, the Fabric loop, the step and evaluation they share, AdamW and
its schedule, callbacks, checkpoint I/O and the FSDP2 strategy."""
