"""Few-step distillation: DMD2 with step-wise multi-teacher guidance."""
