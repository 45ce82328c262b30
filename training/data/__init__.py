"""Datasets: the embedded synthetic shapes generator and COCO-format loading."""
