"""NuDiff engine: diffusion-based augmentation of labeled nuclei tiles (pure PyTorch, no GUI).

Modules, one concept each (layers and import graph: docs/architecture.md):
    fileio      atomic file output, file hashes, JSON record checks, device choice (the bottom layer)
    structure   instance map <-> 3-channel nuclei structure (semantic, horizontal, vertical)
    metrics     Dice, AJI, AJI+, PQ (HoVer-Net definitions)
    geojson     QuPath GeoJSON outlines read as an instance map
    data        reading folders of labeled tiles (images, label formats), validation, tiling
    inspection  pre-flight report of a labeled-tile folder
    subset      the paper's labeled subset (tile features, KMeans, round-robin by cluster)
    synthetic   procedural H&E-like labeled tiles for tests and smoke runs
    config      typed model / diffusion / training records and presets
    unet        U-Net with timestep embedding, attention and SPADE-conditioned decoder
    diffusion   noise schedule, training loss, guided noise prediction
    samplers    DDPM / DDIM / DPM-Solver++ sampling loops
    colour_prior  training tiles' mean colours for the first sampling steps, which the model cannot see
    checkpoint  safetensors + JSON checkpoints and their records
    train       training loops with EMA, resume, multi-process (accelerate)
    run_status  a training run's status.json: read, written, whether it ended on its budget
    pipeline    generation API shared by the CLI and the studio
    guidance    calibrating an image model's guidance scale w against real images
    curate      layout realism filter for sampled structures
    morphology  nucleus shape measures shared by curate and quality
    export      writing curated pairs (zip / folder) in the formats segmenters read
    unzip       unpacking a user's zip safely (no path traversal, links or zip bombs)
    segment     lightweight HoVer-Net-style segmenter for the downstream benchmark
    evaluate    the downstream benchmark (the paper's Table 1)
    quality     alignment, morphology and appearance of a synthetic set against real data
    render, features, demo, errors, cli   pictures, subset descriptors, default models, errors, CLI
"""

__version__ = "0.2.0"
