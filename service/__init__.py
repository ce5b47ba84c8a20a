"""Brain tumour segmentation service and its torch-free core."""
