# Figures for the report: training curves, a pseudo-mask gallery (seed / CRF / IRN / GT) and an IRN
# gallery (boundary map, displacement field, mask).


rule training_curves:
    input:
        log_csv=f"{RESULTS}/{{experiment}}/{{stage}}/train_log.csv",
    output:
        png=report(
            f"{RESULTS}/{{experiment}}/{{stage}}/training_curves.png",
            category="Training",
            subcategory="{experiment}",
            caption="../report/training_curves.rst",
        ),
    log:
        f"{LOGS}/{{experiment}}/training_curves_{{stage}}.log",
    wildcard_constraints:
        stage="classifier|deeplab",
    threads: 1
    resources:
        mem_mb=res.mem_mb(1000),
        runtime=res.runtime(10),
    conda:
        "../envs/data.yaml"
    script:
        "scripts/training_curves.py"


rule mask_gallery:
    input:
        seeds=seed_mask_markers,
        crf=gather.crf(f"{RESULTS}/{{{{experiment}}}}/crf/shard-{{scatteritem}}.json"),
        irn=gather.irn(f"{RESULTS}/{{{{experiment}}}}/irn/masks/shard-{{scatteritem}}.json"),
    output:
        png=report(
            f"{RESULTS}/{{experiment}}/pseudo_mask_gallery.png",
            category="Pseudo-masks",
            subcategory="{experiment}",
            caption="../report/mask_gallery.rst",
        ),
    params:
        cfg=stage_params("eval_masks"),
    log:
        f"{LOGS}/{{experiment}}/mask_gallery.log",
    threads: 1
    resources:
        mem_mb=res.mem_mb(2000),
        runtime=res.runtime(10),
    conda:
        "../envs/data.yaml"
    script:
        "scripts/mask_gallery.py"


rule irn_gallery:
    input:
        model=f"{RESULTS}/{{experiment}}/irn/model.pt",
        irn=gather.irn(f"{RESULTS}/{{{{experiment}}}}/irn/masks/shard-{{scatteritem}}.json"),
    output:
        png=report(
            f"{RESULTS}/{{experiment}}/irn/gallery.png",
            category="Pseudo-masks",
            subcategory="{experiment}",
            caption="../report/irn_gallery.rst",
        ),
    params:
        cfg=stage_params("irn_infer"),
    log:
        f"{LOGS}/{{experiment}}/irn_gallery.log",
    threads: 1
    resources:
        mem_mb=res.mem_mb(4000),
        runtime=res.runtime(10),
        gpu=1,
    conda:
        "../envs/torch.yaml"
    script:
        "scripts/irn_gallery.py"
