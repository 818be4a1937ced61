# Stage 3: multi-scale CAM inference into HDF5 shards (scatter-gather) and seed evaluation.


scattergather:
    cams=CFG["cam"]["shards"],


rule cam_shard:
    input:
        model=f"{RESULTS}/{{experiment}}/classifier/model.pt",
        labels=f"{RESULTS}/labels.csv",
    output:
        shard=f"{RESULTS}/{{experiment}}/cams/shard-{{scatteritem}}.h5",
    params:
        cfg=stage_params("cam"),
    log:
        f"{LOGS}/{{experiment}}/cam_shard-{{scatteritem}}.log",
    benchmark:
        f"{RESULTS}/{{experiment}}/benchmarks/cam_shard-{{scatteritem}}.tsv"
    threads: 4
    resources:
        mem_mb=res.mem_mb(8000),
        runtime=res.runtime(120),
        gpu=1,
    conda:
        "../envs/torch.yaml"
    script:
        "scripts/cam_shard.py"


rule seed_eval:
    input:
        shards=gather.cams(f"{RESULTS}/{{{{experiment}}}}/cams/shard-{{scatteritem}}.h5"),
    output:
        sweep=report(
            f"{RESULTS}/{{experiment}}/seeds/threshold_sweep.csv",
            category="CAM seeds",
            subcategory="{experiment}",
            caption="../report/seed_sweep.rst",
        ),
        gallery=report(
            f"{RESULTS}/{{experiment}}/seeds/gallery.png",
            category="CAM seeds",
            subcategory="{experiment}",
            caption="../report/seed_gallery.rst",
        ),
    params:
        cfg=stage_params("seed_eval"),
    log:
        f"{LOGS}/{{experiment}}/seed_eval.log",
    threads: 1
    resources:
        mem_mb=res.mem_mb(4000),
        runtime=res.runtime(60),
    conda:
        "../envs/data.yaml"
    script:
        "scripts/seed_eval.py"
