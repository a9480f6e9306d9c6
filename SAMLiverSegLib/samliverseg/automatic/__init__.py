"""Layer 5, prompt-free segmentation with trained models (U-Net, slicing student): load once,
segment many."""
