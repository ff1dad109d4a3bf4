"""Study 3: parameter-efficient finetuning (bottleneck adapters, LoRA incl. deformable attention) on
classification and instance segmentation. See ``adaptlab.peft.study`` for the grid and its records."""
