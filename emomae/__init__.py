"""emomae's project-wide pieces: the `emomae` command (cli), config loading (config), the demo
driver (demo) and the optimizer pieces both training stages share (optim). `data_pipelines`,
`pretrain` and `finetune` keep their own jobs and import from here, never from each other's training
code."""
