# Stages 4-5: CRF post-processing of CAM seeds and IRN affinity refinement into pseudo-masks.
# Mask-producing jobs are sharded; each shard's tracked output is a JSON marker naming its masks
# folder (masks-<config hash>/ beside it); a journal beside the marker lets an interrupted shard
# resume only what it wrote itself (wsss.workflow.journal).


scattergather:
    crf=CFG["crf"]["shards"],


rule crf_shard:
    input:
        cams=gather.cams(f"{RESULTS}/{{{{experiment}}}}/cams/shard-{{scatteritem}}.h5"),
        # the seed threshold sweep, only with crf.from_seeds (the chosen threshold sets the background)
        sweep=crf_sweep,
    output:
        marker=f"{RESULTS}/{{experiment}}/crf/shard-{{scatteritem}}.json",
    params:
        cfg=stage_params("crf"),
    log:
        f"{LOGS}/{{experiment}}/crf_shard-{{scatteritem}}.log",
    benchmark:
        f"{RESULTS}/{{experiment}}/benchmarks/crf_shard-{{scatteritem}}.tsv"
    threads: 2
    resources:
        mem_mb=res.mem_mb(4000),
        runtime=res.runtime(240),
    conda:
        "../envs/crf.yaml"
    script:
        "scripts/crf_shard.py"


scattergather:
    irn=CFG["irn"]["shards"],


rule ir_labels_shard:
    input:
        cams=gather.cams(f"{RESULTS}/{{{{experiment}}}}/cams/shard-{{scatteritem}}.h5"),
    output:
        marker=f"{RESULTS}/{{experiment}}/irn/ir_labels/shard-{{scatteritem}}.json",
    params:
        cfg=stage_params("ir_labels"),
    log:
        f"{LOGS}/{{experiment}}/ir_labels_shard-{{scatteritem}}.log",
    benchmark:
        f"{RESULTS}/{{experiment}}/benchmarks/ir_labels_shard-{{scatteritem}}.tsv"
    threads: 2
    resources:
        mem_mb=res.mem_mb(4000),
        runtime=res.runtime(240),
    conda:
        "../envs/crf.yaml"
    script:
        "scripts/ir_labels_shard.py"


rule train_irn:
    input:
        labels=gather.irn(f"{RESULTS}/{{{{experiment}}}}/irn/ir_labels/shard-{{scatteritem}}.json"),
        classifier=f"{RESULTS}/{{experiment}}/classifier/model.pt",
        pretrained=pretrained_weights("irn", "train"),
    output:
        model=f"{RESULTS}/{{experiment}}/irn/model.pt",
    params:
        cfg=stage_params("irn_train"),
        work_dir=f"{RESULTS}/{{experiment}}/irn/work",
    log:
        f"{LOGS}/{{experiment}}/train_irn.log",
    benchmark:
        f"{RESULTS}/{{experiment}}/benchmarks/train_irn.tsv"
    threads: 4
    resources:
        mem_mb=res.mem_mb(16000),
        runtime=res.runtime(240),
        gpu=1,
    conda:
        "../envs/torch.yaml"
    script:
        "scripts/train_irn.py"


rule irn_masks_shard:
    input:
        cams=gather.cams(f"{RESULTS}/{{{{experiment}}}}/cams/shard-{{scatteritem}}.h5"),
        model=f"{RESULTS}/{{experiment}}/irn/model.pt",
    output:
        marker=f"{RESULTS}/{{experiment}}/irn/masks/shard-{{scatteritem}}.json",
        conf_marker=f"{RESULTS}/{{experiment}}/irn/confidence/shard-{{scatteritem}}.json",
    params:
        cfg=stage_params("irn_infer"),
    log:
        f"{LOGS}/{{experiment}}/irn_masks_shard-{{scatteritem}}.log",
    benchmark:
        f"{RESULTS}/{{experiment}}/benchmarks/irn_masks_shard-{{scatteritem}}.tsv"
    # the random walk computes with one thread (bench/threads.py: two 2-thread walks at once took 3x as
    # long as two 1-thread walks, and a second thread does not speed up a walk alone)
    threads: 1
    resources:
        mem_mb=res.mem_mb(4000),
        runtime=res.runtime(240),
        gpu=1,
    conda:
        "../envs/torch.yaml"
    script:
        "scripts/irn_masks_shard.py"


# AffinityNet (PSA; wsss.refine.affinitynet, docs/affinitynet.md): the low/high-alpha CRF label
# maps, AffinityNet training, random-walk pseudo-masks. Only experiments with
# deeplab.pseudo_masks: affinitynet ask for them (or a target under affinitynet/).
scattergather:
    affinitynet=CFG["affinitynet"]["shards"],


rule affinity_labels_shard:
    input:
        cams=gather.cams(f"{RESULTS}/{{{{experiment}}}}/cams/shard-{{scatteritem}}.h5"),
    output:
        marker=f"{RESULTS}/{{experiment}}/affinitynet/labels/shard-{{scatteritem}}.json",
    params:
        cfg=stage_params("affinity_labels"),
    log:
        f"{LOGS}/{{experiment}}/affinity_labels_shard-{{scatteritem}}.log",
    benchmark:
        f"{RESULTS}/{{experiment}}/benchmarks/affinity_labels_shard-{{scatteritem}}.tsv"
    threads: 2
    resources:
        mem_mb=res.mem_mb(4000),
        runtime=res.runtime(240),
    conda:
        "../envs/crf.yaml"
    script:
        "scripts/affinity_labels_shard.py"


rule train_affinitynet:
    input:
        labels=gather.affinitynet(f"{RESULTS}/{{{{experiment}}}}/affinitynet/labels/shard-{{scatteritem}}.json"),
        # read only by AEFT's model selection (affinitynet.train.select); the labels depend on them anyway
        cams=gather.cams(f"{RESULTS}/{{{{experiment}}}}/cams/shard-{{scatteritem}}.h5"),
        classifier=f"{RESULTS}/{{experiment}}/classifier/model.pt",
        pretrained=pretrained_weights("affinitynet", "train"),
    output:
        model=f"{RESULTS}/{{experiment}}/affinitynet/model.pt",
    params:
        cfg=stage_params("affinitynet_train"),
        work_dir=f"{RESULTS}/{{experiment}}/affinitynet/work",
    log:
        f"{LOGS}/{{experiment}}/train_affinitynet.log",
    benchmark:
        f"{RESULTS}/{{experiment}}/benchmarks/train_affinitynet.tsv"
    threads: 4
    resources:
        mem_mb=res.mem_mb(16000),
        runtime=res.runtime(240),
        gpu=1,
    conda:
        "../envs/torch.yaml"
    script:
        "scripts/train_affinitynet.py"


rule affinitynet_masks_shard:
    input:
        cams=gather.cams(f"{RESULTS}/{{{{experiment}}}}/cams/shard-{{scatteritem}}.h5"),
        model=f"{RESULTS}/{{experiment}}/affinitynet/model.pt",
    output:
        marker=f"{RESULTS}/{{experiment}}/affinitynet/masks/shard-{{scatteritem}}.json",
    params:
        cfg=stage_params("affinitynet_infer"),
    log:
        f"{LOGS}/{{experiment}}/affinitynet_masks_shard-{{scatteritem}}.log",
    benchmark:
        f"{RESULTS}/{{experiment}}/benchmarks/affinitynet_masks_shard-{{scatteritem}}.tsv"
    # the random walk computes with one thread (bench/threads.py: two 2-thread walks at once took 3x as
    # long as two 1-thread walks, and a second thread does not speed up a walk alone)
    threads: 1
    resources:
        mem_mb=res.mem_mb(4000),
        runtime=res.runtime(240),
        gpu=1,
    conda:
        "../envs/torch.yaml"
    script:
        "scripts/affinitynet_masks_shard.py"


# Evaluation of a folder of masks (CRF, IR labels, IRN or AffinityNet pseudo-masks) on the evaluation split: one
# rule, the mask kind is the `masks` wildcard (its folder under the run).
rule eval_masks:
    input:
        markers=mask_markers,
    output:
        metrics=report(
            f"{RESULTS}/{{experiment}}/{{masks}}/metrics.csv",
            category="Pseudo-masks",
            subcategory="{experiment}",
            caption="../report/crf_metrics.rst",
        ),
        per_class=f"{RESULTS}/{{experiment}}/{{masks}}/per_class.csv",
    params:
        cfg=stage_params("eval_masks"),
        kind=lambda wildcards: MASK_KINDS[wildcards.masks][0],
    log:
        f"{LOGS}/{{experiment}}/eval_masks/{{masks}}.log",
    threads: 1
    resources:
        mem_mb=res.mem_mb(2000),
        runtime=res.runtime(60),
    conda:
        "../envs/data.yaml"
    script:
        "scripts/eval_masks.py"
