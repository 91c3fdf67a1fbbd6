"""DreamBooth fine-tuning of SDXL with prior preservation (Ruiz et al., CVPR 2023), in MindSpore: LoRA, or with
`--finetune full` every UNet weight (the paper's own).

    python train_dreambooth.py --config configs/training/sd_xl_base_finetune_dreambooth_lora_910b.yaml \
        --weight checkpoints/sd_xl_base_1.0_ms.ckpt --instance_data_path DIR --instance_prompt "A photo of a sks dog" \
        --class_data_path DIR --class_prompt "A photo of a dog" --device_target Ascend

Data parallel over N processes (per_batch_size is per process; gradients are averaged; rank 0 writes):
    msrun --worker_num=N --local_worker_num=N --master_port=8118 --log_dir=logs --join=True train_dreambooth.py ... --is_parallel True
    mpirun -n N python train_dreambooth.py ... --is_parallel True

main() calls the phases of mindbooth/training.py in order. Importing this file does nothing else: MindSpore is
imported in main(), after `__main__` has re-executed on mimalloc and turned mpirun's variables into MindSpore's.
"""
from mindbooth.allocator import preload_mimalloc
from mindbooth.distributed import setup_distributed_environment


def main(argv=None):
    """Train as `argv` (default: the command line) says; returns the engine. In the compile child
    (mindbooth/step_graphs.py) it compiles the step graphs and returns before any data is read."""
    from mindbooth import finetune, step_graphs
    from mindbooth import training as phase
    from mindbooth.compile_cache import precompile_folder
    from mindbooth.pipeline import text2image_for

    # ---- arguments, config and every input checked; runtime ---------------------------------------------------
    run = phase.parse_and_check(argv)
    dist = phase.set_up_runtime(run)
    passes = phase.loss_passes(run)
    step_shapes = phase.step_shapes(run, passes)

    # ---- the step's graphs, compiled by a child that exits before this process builds its model ---------------
    child_folder = precompile_folder()  # set in that child only
    step_cache = child_folder if child_folder is not None else step_graphs.step_graphs_in_child(
        run.args, argv, finetune.step_graph_config(run.config), run.weights, step_shapes, run.save_path, __file__)

    # ---- text embeddings, with --pre_compute_text_embeddings: the text encoder built, used and freed first ----
    text_embeddings = phase.precompute_text_embeddings(run) if child_folder is None else None

    # ---- model -----------------------------------------------------------------------------------------------
    engine, lora = phase.load_model(run)
    projections = phase.context_projections(engine, passes, run)
    if child_folder is not None:  # the child: compile the step graphs into its folder and stop
        if not engine.trains_text_encoders:  # (its conditioning is token ids, not the cached embeddings of step_shapes)
            steps = phase.build_steps(engine, lora, run, dist, passes)
            step_graphs.use_step_graphs(child_folder, steps.grad_step, steps.apply_step, step_shapes, projections[0])
        return engine
    text2image = text2image_for(run.config, engine, text_embeddings)

    # ---- class images, data ----------------------------------------------------------------------------------
    phase.ensure_class_images(run, dist, text2image)
    data = phase.build_data(run, dist, engine, text2image, text_embeddings)

    # ---- optimizer, resume -----------------------------------------------------------------------------------
    steps = phase.build_steps(engine, lora, run, dist, passes)
    if step_cache is not None and not engine.trains_text_encoders:  # loaded, not compiled
        step_graphs.use_step_graphs(step_cache, steps.grad_step, steps.apply_step, step_shapes, projections[0])
    state, start_step = phase.resume_or_start(run, dist, engine, steps, data)

    # ---- training loop, save ---------------------------------------------------------------------------------
    phase.train_loop(run, dist, engine, steps, data, passes, projections, state, start_step, text2image)
    phase.save_final(run, dist, state, text2image)
    return engine


if __name__ == "__main__":
    preload_mimalloc()  # on CPU: re-executes this script with mimalloc preloaded (mindbooth/allocator.py), first
    setup_distributed_environment()  # before MindSpore is imported: mpirun's variables -> MindSpore's
    main()
