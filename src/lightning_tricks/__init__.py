"""lightning-tricks: callbacks, recipes and DataModules for the classic tricks of training CNNs."""

__version__ = "0.1.0"
