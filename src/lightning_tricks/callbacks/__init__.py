"""Callbacks that babysit and improve training on any LightningModule."""
