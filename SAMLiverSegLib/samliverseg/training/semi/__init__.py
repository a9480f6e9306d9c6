"""Semi-SAM+ (trainer kind ``semi``): formulas, invertible views, teachers, the trainer."""
