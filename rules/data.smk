# Stage 1: datasets (synthetic generator, VOC 2012 + SBD aug and COCO 2014 downloads), image-level
# labels and dataset statistics.


rule synthetic_dataset:
    output:
        marker=f"{DATA_ROOT}/.complete",
    params:
        preset=CFG["synthetic"]["preset"],
        seed=CFG["synthetic"]["seed"],
        overrides=CFG["synthetic"]["overrides"],
    log:
        f"{LOGS}/synthetic_dataset.log",
    threads: 1
    resources:
        mem_mb=res.mem_mb(2000),
        runtime=res.runtime(30),
    conda:
        "../envs/data.yaml"
    script:
        "scripts/synthetic_dataset.py"


rule image_labels:
    input:
        ready=dataset_ready(),
    output:
        labels=f"{RESULTS}/labels.csv",
    params:
        cfg=stage_config(CFG),
    log:
        f"{LOGS}/image_labels.log",
    threads: 1
    resources:
        mem_mb=res.mem_mb(2000),
        runtime=res.runtime(60),
    conda:
        "../envs/data.yaml"
    script:
        "scripts/image_labels.py"


rule dataset_stats:
    input:
        ready=dataset_ready(),
    output:
        stats=report(f"{RESULTS}/stats.csv", category="Dataset", caption="../report/stats.rst"),
        montage=report(f"{RESULTS}/montage.png", category="Dataset", caption="../report/montage.rst"),
    params:
        cfg=stage_config(CFG, "stats"),
    log:
        f"{LOGS}/dataset_stats.log",
    threads: 1
    resources:
        mem_mb=res.mem_mb(2000),
        runtime=res.runtime(60),
    conda:
        "../envs/data.yaml"
    script:
        "scripts/dataset_stats.py"


# One download rule per archive (VOC 2012 trainval, SBD aug labels, COCO 2014 images and
# annotations): resumable, checksum-verified, extracted safely; the marker is written last.
# The saliency maps of EPS (voc12_saliency) download only when an experiment's training asks for them.
for _archive in wpaths.ARCHIVES_OF[CFG["dataset"]["name"]] + wpaths.saliency_archives(CFG) if not CFG["dataset"]["root"] else []:

    rule:
        name:
            f"download_{_archive}"
        output:
            marker=wpaths.archive_marker(CFG, _archive),
        params:
            archive=_archive,
            options=wpaths.download_options(CFG, _archive),
        log:
            f"{LOGS}/download_{_archive}.log",
        threads: 1
        resources:
            mem_mb=res.mem_mb(1000),
            runtime=res.runtime(600),
        retries: 3
        conda:
            "../envs/data.yaml"
        script:
            "scripts/download.py"


rule voc_train_aug_list:
    input:
        markers=wpaths.archive_inputs(CFG),
    output:
        ids=f"{DATA_ROOT}/ImageSets/Segmentation/train_aug.txt",
    params:
        given=CFG["voc12"]["train_aug_list"],
    log:
        f"{LOGS}/voc_train_aug_list.log",
    threads: 1
    resources:
        mem_mb=res.mem_mb(1000),
        runtime=res.runtime(30),
    conda:
        "../envs/data.yaml"
    script:
        "scripts/voc_train_aug_list.py"


rule coco_masks:
    input:
        markers=wpaths.archive_inputs(CFG),
    output:
        marker=f"{DATA_ROOT}/mask/.complete",
    params:
        crowd=CFG["coco14"]["crowd"],
    log:
        f"{LOGS}/coco_masks.log",
    threads: 1
    resources:
        mem_mb=res.mem_mb(12000),
        runtime=res.runtime(120),
    conda:
        "../envs/data.yaml"
    script:
        "scripts/coco_masks.py"
