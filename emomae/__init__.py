"""emomae's project-wide pieces: the `emomae` command (cli), config loading (config) and the demo
driver (demo). `data_pipelines`, `pretrain` and `finetune` keep their own jobs and import from here,
never from each other's training code."""
