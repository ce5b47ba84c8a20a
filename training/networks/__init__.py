"""U-Net and ResU-Net for 2D and 3D."""
