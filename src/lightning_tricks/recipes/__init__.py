"""Recipes: the image-classification LightningModule and its building blocks."""
