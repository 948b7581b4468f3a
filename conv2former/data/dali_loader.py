"""The DALI backends: one graph for ``dali-gpu`` (``mixed`` decoding on the GPU) and ``dali-cpu`` (device_id=None).

Train: ``readers.webdataset`` (our index files, the epoch's shard order, this rank's range, a seeded shuffle
buffer) -> fused decode + random-resized-crop -> resize -> flip -> RandAugment -> normalize to float NCHW.
Eval: decode -> resize the shorter side to size/crop_pct and center crop (or "squash" to size x size) -> normalize.

RandAugment is timm's ``rand-m9-mstd0.5-inc1`` (what the torch backend and ConvNeXt use) written with DALI operators
in ``conv2former.data.dali_randaugment``: the same 15 ops and magnitude rules, each drawn op applied with
probability 0.5, magnitude noise of std 0.5, warps filled with the mean colour; the warps are bilinear (DALI has no
bicubic warp) and Equalize is OpenCV's lookup table. That module's docstring lists exactly what matches and what not.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.pytorch import feed_ndarray

from conv2former.config import DataConfig
from conv2former.data import shard_format as fmt
from conv2former.data.base import ShardLoader
from conv2former.data.dali_randaugment import Node, fill_colour, rand_augment
from conv2former.data.shards import SplitShards, sample_seed, shard_problem, slice_index
from conv2former.data.size_schedule import SizeSchedule

READER = "reader"
READER_LAYOUT = "rank-slices"  # each rank's reader holds its own samples (a DALI position is only valid in the same)

# The mixed decoder's fixed arguments; its buffers follow the split's largest image (decoder_buffers), and the training
# decoder's share for the hardware JPEG decoder is data.hw_decoder_load.
GPU_DECODER_ARGS: Dict[str, Any] = dict(
    jpeg_fancy_upsampling=True,  # chroma upsampled as libjpeg-turbo does: the CPU backends' pixels (PIL, DALI cpu)
)
# nvJPEG's buffers for full-resolution ImageNet (NVIDIA's DALI ResNet-50 example: its biggest sample, 5980x6430 px),
# taken when the manifest does not say how large the stored images are (shards made before it recorded that)
FULL_RESOLUTION = (5980, 6430)
DEVICE_PADDING_PER_PIXEL = 211025920 / (5980 * 6430)  # bytes of nvJPEG device buffer per pixel of the largest image
HOST_PADDING_PER_PIXEL = 140544512 / (5980 * 6430)  # ... of pinned host buffer
MIN_PADDING = 8 << 20  # bytes: never below 8 MiB (small images, many threads)


def decoder_buffers(largest_image: Optional[Tuple[int, int]]) -> Dict[str, Any]:
    """The mixed decoder's buffer sizes for the largest stored image of the split (``largest_image``, from the shard
    manifest; None: full-resolution ImageNet): for shards downscaled by ``shard.py --max-side 512`` the floor of
    8 MiB instead of 201 MiB of device buffer (and 134 MiB of pinned host buffer) per decoder thread."""
    width, height = largest_image or FULL_RESOLUTION
    pixels = width * height
    return dict(
        device_memory_padding=max(MIN_PADDING, int(pixels * DEVICE_PADDING_PER_PIXEL)),
        host_memory_padding=max(MIN_PADDING, int(pixels * HOST_PADDING_PER_PIXEL)),
        preallocate_width_hint=width,
        preallocate_height_hint=height,
    )


def _reader(paths: List[str], index_paths: List[str], train: bool, buffer: int) -> Any:
    """The webdataset reader over this rank's own samples (``DaliLoader._rank_files``): no DALI sharding."""
    return fn.readers.webdataset(
        paths=paths,
        index_paths=index_paths,
        ext=[fmt.IMAGE_KEY, fmt.LABEL_KEY],
        dtypes=[types.UINT8, types.INT64],
        missing_component_behavior="error",
        random_shuffle=train,
        initial_fill=buffer,
        pad_last_batch=not train,
        stick_to_shard=True,
        name=READER,
        dont_use_mmap=True,  # read(): a shard truncated during the epoch is an error we report, not a SIGBUS
    )


def _normalize(
    images: Node,
    cfg: DataConfig,
    mirror: Optional[Node] = None,
    crop: Optional[Tuple[int, int]] = None,
    crop_pos: Tuple[Any, Any] = (0.5, 0.5),
    layout: str = "CHW",
) -> Node:
    kwargs: Dict[str, Any] = {}
    if crop is not None:
        kwargs.update(crop=crop, crop_pos_y=crop_pos[0], crop_pos_x=crop_pos[1])
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout=layout,  # HWC for channels_last batches: the loader hands an NCHW view, no copy
        mirror=mirror if mirror is not None else 0,
        mean=[m * 255 for m in cfg.mean],
        std=[s * 255 for s in cfg.std],
        **kwargs,
    )


def train_graph(
    cfg: DataConfig,
    paths: List[str],
    index_paths: List[str],
    gpu_decoder: Optional[Dict[str, Any]] = None,
    layout: str = "CHW",
) -> Tuple[Node, Node]:
    """Training: ``gpu_decoder``: the mixed (nvJPEG) decoder's arguments, None for CPU decoding;
    ``layout``: CHW, or HWC for channels_last batches."""
    jpg, label = _reader(paths, index_paths, True, cfg.shuffle_buffer)
    aug = cfg.augment
    images = fn.decoders.image_random_crop(
        jpg,
        device="cpu" if gpu_decoder is None else "mixed",
        output_type=types.RGB,
        random_area=list(aug.scale),
        random_aspect_ratio=list(aug.ratio),
        num_attempts=10,
        **({**gpu_decoder, "hw_decoder_load": cfg.hw_decoder_load} if gpu_decoder is not None else {}),
    )
    images = fn.resize(
        images, resize_x=cfg.image_size, resize_y=cfg.image_size, interp_type=types.INTERP_CUBIC, antialias=True
    )
    mirror = fn.random.coin_flip(probability=aug.hflip)
    if aug.randaugment:
        images = rand_augment(
            images,
            n=aug.randaugment_n,
            m=aug.randaugment_m,
            shape=(cfg.image_size, cfg.image_size),
            fill=fill_colour(cfg.mean),
        )
    return _normalize(images, cfg, mirror=mirror, layout=layout), label


def eval_graph(
    cfg: DataConfig,
    paths: List[str],
    index_paths: List[str],
    gpu_decoder: Optional[Dict[str, Any]] = None,
    layout: str = "CHW",
) -> Tuple[Node, Node]:
    """Evaluation (timm's resize and center crop); the arguments are ``train_graph``'s."""
    jpg, label = _reader(paths, index_paths, False, 1)
    images = fn.decoders.image(
        jpg,
        device="cpu" if gpu_decoder is None else "mixed",
        output_type=types.RGB,
        **(gpu_decoder or {}),
    )
    size = cfg.image_size
    if cfg.crop_mode == "squash":
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC, antialias=True)
        return _normalize(images, cfg, layout=layout), label
    # timm/torchvision geometry, exactly: the shorter side to floor(size / crop_pct), the longer to
    # int(scale * long / short), and a center crop whose offset rounds half to even like Python's round().
    scale = int(size / cfg.crop_pct)
    shape = images.shape(dtype=types.FLOAT)
    h, w = shape[0], shape[1]
    short = dmath.min(h, w)
    new_h, new_w = dmath.floor(scale * h / short), dmath.floor(scale * w / short)
    images = fn.resize(images, resize_y=new_h, resize_x=new_w, interp_type=types.INTERP_CUBIC, antialias=True)
    position = (_center(new_h, size), _center(new_w, size))
    return _normalize(images, cfg, crop=(size, size), crop_pos=position, layout=layout), label


def _center(length: Node, crop: int) -> Node:
    """crop_pos giving torchvision's CenterCrop offset int(round((length - crop) / 2)) (round half to even)."""
    d = length - crop
    k = dmath.floor(d / 2)
    anchor = k + (d - 2 * k) * (k - 2 * dmath.floor(k / 2))
    return anchor / dmath.max(d, 1)


class DaliLoader(ShardLoader):
    def __init__(
        self,
        cfg: DataConfig,
        shards: SplitShards,
        train: bool,
        rank: int,
        world_size: int,
        device: torch.device,
        gpu: bool,
        sizes: Optional[SizeSchedule] = None,
    ) -> None:
        backend = "dali-gpu" if gpu else "dali-cpu"
        super().__init__(cfg, shards, train, rank, world_size, device, backend, sizes)
        self.gpu = gpu
        self._pipe: Any = None  # the built DALI pipeline (None: built at the next batch)
        self._checkpoint: Optional[bytes] = None
        self._slice_dir: Optional[str] = None  # this rank's indexes of partly read shards

    def _build(self) -> None:
        paths, index_paths = self._rank_files()
        graph = train_graph if self.train else eval_graph
        cfg, rank, gpu = self.epoch_cfg(), self.rank, self.gpu  # the epoch's crop size (progressive resizing)
        layout = "HWC" if self.channels_last else "CHW"
        decoder = {**GPU_DECODER_ARGS, **decoder_buffers(self.shards.largest_image)} if gpu else None

        @pipeline_def(enable_conditionals=True)
        def pipeline() -> Tuple[Node, Node]:
            return graph(cfg, paths, index_paths, decoder, layout)

        with warnings.catch_warnings():  # some DALI operators call deprecated aliases of others internally
            warnings.simplefilter("ignore", DeprecationWarning)
            pipe = pipeline(
                batch_size=self.batch_size,
                num_threads=max(1, cfg.workers),
                device_id=self.device.index if gpu else None,
                seed=sample_seed(self.seed, self.epoch, rank),
                enable_checkpointing=self.train,
                checkpoint=self._checkpoint,
                prefetch_queue_depth=2,
                exec_dynamic=True,
            )
            pipe.build()
        self._checkpoint = None
        self._pipe = pipe

    def _rank_files(self) -> Tuple[List[str], List[str]]:
        """The tars and indexes of this rank's part of the epoch: the shards it overlaps, the two at its ends through
        an index of just its samples (written to a folder of this loader, replaced at every build). DALI then parses
        ~1/world of the indexes (given all 1,400 of a 22k split, its reader took 26 s and 5 GB per rank to start)."""
        if self._slice_dir is None:
            self._slice_dir = tempfile.mkdtemp(prefix=f"c2f-dali-rank{self.rank}-")
            atexit.register(shutil.rmtree, self._slice_dir, True)
        for stale in os.listdir(self._slice_dir):
            os.remove(os.path.join(self._slice_dir, stale))
        slices = self.epoch_slices()
        for shard, first, stop in slices:
            if first == 0 and stop == len(shard):
                shard.check_listed()  # a whole shard goes to DALI with its own index
        paths = [shard.tar for shard, _, _ in slices]
        return paths, [slice_index(shard, first, stop, self._slice_dir) for shard, first, stop in slices]

    def _reset(self) -> None:
        self._pipe = None
        self._checkpoint = None

    def _next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._pipe is None:
            self._build()
        try:
            images, labels = self._pipe.run()
        except RuntimeError as err:  # DALI's reader failed: a shard deleted (at a rebuild) or truncated under it
            self._blame_shards(err)  # raises, unless skipping the unreadable shards it names
            self._pipe = None  # skipping: this epoch goes on without them (the rank's range restarts)
            return self._next_batch()
        stream = torch.cuda.current_stream(self.device) if self.gpu else None
        images = images.as_tensor()
        out = torch.empty(images.shape(), dtype=torch.float32, device=self.device if self.gpu else "cpu")
        feed_ndarray(images, out, cuda_stream=stream)
        if self.channels_last:  # NHWC memory seen as NCHW: a channels_last batch without a copy
            out = out.permute(0, 3, 1, 2)
        labels_cpu = labels.as_cpu() if hasattr(labels, "as_cpu") else labels
        label_tensor = torch.empty((self.batch_size, 1), dtype=torch.int64, pin_memory=self.gpu)  # async copy below
        feed_ndarray(labels_cpu.as_tensor(), label_tensor)
        return out.to(self.device, non_blocking=True), label_tensor.view(-1).to(self.device, non_blocking=True)

    def _blame_shards(self, err: RuntimeError) -> None:
        """Name the shards of this epoch that cannot be read now (one stat each) as bad; none: re-raise ``err``."""
        found = False
        for shard in self.shards.shards:
            problem = shard_problem(shard) if shard.tar not in self.skipped_shards else None
            if problem is not None:
                self.bad_shard(shard.tar, problem)
                found = True
        if not found:
            raise err

    def _extra_state(self) -> Dict[str, Any]:
        if self.train and self.step > 0:
            if self._pipe is not None:
                return {"dali_checkpoint": self._pipe.checkpoint(), "dali_reader": READER_LAYOUT}
            if self._checkpoint is not None:  # restored but not yet rebuilt: hand the position on unchanged
                return {"dali_checkpoint": self._checkpoint, "dali_reader": READER_LAYOUT}
        return {}

    def _restore(self, state: Dict[str, Any]) -> None:
        self._pipe = None
        self._checkpoint = None
        if self.step == 0:
            return
        if self.train:
            if state.get("dali_reader") != READER_LAYOUT:  # a position in a reader set up another way
                warnings.warn(
                    f"the DALI position was saved by a reader laid out differently: epoch {self.epoch} "
                    "restarts from its start"
                )
                self.step = 0
                return
            self._checkpoint = state.get("dali_checkpoint")  # same backend, checked by load_state_dict
            return
        # eval has no randomness: rebuild and fast-forward by reading
        step, self.step = self.step, 0
        for _ in range(step):
            self._next_batch()
            self.step += 1
