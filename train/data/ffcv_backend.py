"""The FFCV backend, with every workaround for FFCV 1.0.2 in one place: our own shard order (sample keys that
carry the repeated-augmentation copy), seeded train crops, the evaluation decoder, the reading thread's
start and stop, and torch's thread count."""

from __future__ import annotations

import functools
import queue
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from train.data.crops import CROP_RATIO, _crop_and_flip
from train.data.eval_transform import _eval_kernel
from train.data.sharding import ShardLoader
from train.data.writer import check_stored_resolution, read_class_names

if TYPE_CHECKING:
    from ffcv.loader import Loader

    from train.data.config import DataConfig


@contextmanager
def _keep_torch_threads() -> Iterator[None]:
    """Undo FFCV's changes to torch's (process-wide) intra-op thread count inside the block.

    Importing ffcv sets it to 1, and every FFCV Loader construction and epoch (also from its reading thread) set
    it to the loader's num_workers, which would silently slow the model's CPU work.
    """
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _require_ffcv() -> None:
    """Import ffcv (only the ffcv paths need it) with a helpful message when it is missing."""
    try:
        with _keep_torch_threads():
            import ffcv.loader  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "the ffcv paths need the ffcv package (scripts/setup.sh installs it); without it use backend='imagefolder'"
        ) from error


# FFCV 1.0.2 mutates numba's interned array types when it builds a Loader (its memory managers set
# `.mutable = False` on `numba.uint8[::1]`), which changes the hash of keys in the overload tables of functions
# compiled earlier; when such a function is garbage-collected, numba's finalizer prints "Exception ignored ...
# KeyError". Loaders are therefore kept for the life of the process (a run builds two; each holds the .beton's
# metadata and compiled pipeline, not its batch buffers).
_FFCV_LOADERS: list[Any] = []


# FFCV hands its decoders only the sample numbers its traversal order yields. To tell a sample's repeated-
# augmentation copies apart, our order yields sample keys, `index | copy << 40`, and our decoders (image and
# label) split them; FFCV's memory scheduler is given the plain indices (see `_schedule_plain_indices`).
_COPY_SHIFT = 40


_INDEX_MASK = (1 << _COPY_SHIFT) - 1


def sample_keys(indices: np.ndarray, copies: np.ndarray) -> np.ndarray:
    """The keys our FFCV order yields: `index | copy << 40` (uint64), the index alone for copy 0."""
    return indices.astype(np.uint64) | (copies.astype(np.uint64) << np.uint64(_COPY_SHIFT))


def _ffcv_order(shard: Callable[[int, int], tuple[np.ndarray, np.ndarray]]) -> Any:
    """An FFCV traversal order that reads the sample keys of `shard(dataset_size, epoch)` (see `sample_keys`).

    We shard ourselves instead of using FFCV's `distributed=True`, which (1.0.2) takes rank and world size
    only from an initialised torch.distributed (it works on CPU with gloo, but cannot be given them
    explicitly), pads every shard to equal length by repeating samples (so a distributed validation counts
    some images twice) and raises for QUASI_RANDOM. `Loader(order=...)` documents custom TraversalOrders but
    checks `isinstance(order, TraversalOrder)` and then calls `order(loader)`, so a class is rejected; we
    pass an instance whose call binds it to the loader.
    """
    from ffcv.traversal_order.base import TraversalOrder

    class ShardOrder(TraversalOrder):
        def __init__(self) -> None:  # bound to a loader in __call__, not here
            pass

        def __call__(self, loader: Loader) -> ShardOrder:
            super().__init__(loader)
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            return sample_keys(*shard(len(self.indices), epoch))  # self.indices: all of the .beton's samples

    return ShardOrder()


def _label_decoder() -> Any:
    """FFCV's IntDecoder (int64 labels) for our sample keys: the label of `key & _INDEX_MASK`."""
    from ffcv.fields.decoders import IntDecoder

    index_mask = np.uint64(_INDEX_MASK)

    class SampleKeyIntDecoder(IntDecoder):
        def generate_code(self) -> Callable:
            def decode(
                keys: np.ndarray, destination: np.ndarray, metadata: np.ndarray, storage_state: tuple
            ) -> np.ndarray:
                for ix in range(len(keys)):
                    destination[ix] = metadata[keys[ix] & index_mask]
                return destination[: len(keys)]

            return decode

    return SampleKeyIntDecoder()


def _schedule_plain_indices(loader: Loader) -> None:
    """Make `loader`'s memory manager plan each epoch's reads from sample indices, not our sample keys.

    With os_cache=False, FFCV 1.0.2's process cache looks each batch's sample numbers up in a defaultdict of
    the pages they live on; a key it does not know (a copy > 0) would get no pages, and the decoder would read
    pages that were never loaded. (With os_cache=True the schedule ignores the sample numbers.)
    """
    manager = loader.memory_manager
    schedule_epoch = manager.schedule_epoch
    index_mask = np.uint64(_INDEX_MASK)

    def schedule_indices(batches: Sequence[np.ndarray]) -> Any:
        return schedule_epoch([np.asarray(batch, dtype=np.uint64) & index_mask for batch in batches])

    manager.schedule_epoch = schedule_indices


@functools.cache
def _ffcv_kernels() -> tuple[Callable, Callable, Callable]:
    """numba builds for FFCV's compiled decoder: (crop_and_flip, load_int64, flip_width_in_place).

    `load_int64(address)` reads an int64 that Python changes after compilation: numba freezes the arrays a
    compiled function captures (their values at compile time are baked into the code), and FFCV compiles a
    loader's pipeline once, so the epoch reaches it through the address of an array its decoder owns.
    """
    import numba
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _int64_at(typingctx: Any, address: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.int64)))

        return types.CPointer(types.int64)(types.intp), codegen

    @numba.njit(nogil=True)
    def load_int64(address: int) -> int:
        return _int64_at(address)[0]

    @numba.njit(nogil=True)
    def flip_width_in_place(image: np.ndarray) -> None:  # (H, W, C)
        height, width, channels = image.shape
        for r in range(height):
            for c in range(width // 2):
                for k in range(channels):
                    image[r, c, k], image[r, width - 1 - c, k] = image[r, width - 1 - c, k], image[r, c, k]

    # No fastmath (FFCV compiles its decoders with it): the box must match the Python build bit for bit.
    return numba.njit(nogil=True)(_crop_and_flip), load_int64, flip_width_in_place


def _seeded_crop_decoder(output_size: tuple[int, int], scale: tuple[float, float], seed: int, hflip: bool) -> Any:
    """FFCV's RandomResizedCropRGBImageDecoder with its box and flip from `crop_and_flip(seed, epoch, index, copy)`.

    FFCV 1.0.2 draws the box from numba's per-thread `np.random`, which nothing seeds and which the decoding
    threads share out by scheduling, so no two processes see the same crops. This decoder decodes and crops
    exactly as FFCV's does (full JPEG decode, then OpenCV's crop-and-resize into the batch, in the same parallel
    loop) and then flips in place, so RandomHorizontalFlip (a second pass and buffer) is not needed either.
    It reads our sample keys (`sample_keys`). `set_epoch` must be called before each epoch's reading thread
    starts.
    """
    from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.compiler import Compiler

    class SeededRandomResizedCropRGBImageDecoder(RandomResizedCropRGBImageDecoder):
        def __init__(self) -> None:
            super().__init__(output_size, scale=scale, ratio=CROP_RATIO)
            # Read by the compiled code through its address (see _ffcv_kernels); never reallocated, and kept
            # alive by this decoder, which the loader (kept for the process's life) holds.
            self.epoch = np.zeros(1, dtype=np.int64)

        def set_epoch(self, epoch: int) -> None:
            self.epoch[0] = epoch

        def generate_code(self) -> Callable:
            # ResizedCropRGBImageDecoder.generate_code with the box from crop_and_flip and an in-place flip.
            crop_and_flip_c, load_int64, flip_c = _ffcv_kernels()
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            epoch_address = self.epoch.ctypes.data
            index_mask, copy_shift = np.uint64(_INDEX_MASK), np.uint64(_COPY_SHIFT)
            scale_lo, scale_hi = float(self.scale[0]), float(self.scale[1])
            ratio_lo, ratio_hi = float(self.ratio[0]), float(self.ratio[1])

            def decode(
                batch_indices: np.ndarray, my_storage: tuple, metadata: np.ndarray, storage_state: tuple
            ) -> np.ndarray:
                destination, temp_storage = my_storage
                epoch = load_int64(epoch_address)  # once per batch, before the parallel loop
                for dst_ix in my_range(len(batch_indices)):
                    key = batch_indices[dst_ix]
                    source_ix = key & index_mask
                    copy = key >> copy_shift
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                        temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    top, left, h, w, flip = crop_and_flip_c(
                        seed, epoch, source_ix, copy, height, width, scale_lo, scale_hi, ratio_lo, ratio_hi
                    )
                    resize_crop_c(temp_buffer, top, top + h, left, left + w, destination[dst_ix])
                    if hflip and flip:
                        flip_c(destination[dst_ix])
                return destination[: len(batch_indices)]

            decode.is_parallel = True  # FFCV: compile with prange over the batch when num_workers > 1
            return decode

    return SeededRandomResizedCropRGBImageDecoder()


def _eval_decoder(img_size: int, resize_short: int, interpolation: str) -> Any:
    """An FFCV image decoder that yields the evaluation transform of each image (`eval_resize_crop`).

    FFCV's CenterCropRGBImageDecoder cuts a centre square of `ratio` x the shorter side and shrinks it with
    OpenCV's INTER_AREA; the study's transform resizes the whole image with Pillow's antialiased bicubic first
    and then crops. This decoder decodes the stored image in full (as FFCV's does) and runs our numba port of
    Pillow's resampling on the crop window, so both backends give the same pixels from the same stored image.
    """
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.state import State

    class ResizeCenterCropRGBImageDecoder(SimpleRGBImageDecoder):
        def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple]:
            # An output batch and one decoding buffer per sample, as FFCV's ResizedCropRGBImageDecoder.
            largest = np.uint64(self.metadata["width"].max()) * np.uint64(self.metadata["height"].max())
            shape = (img_size, img_size, 3)
            uint8 = np.dtype("<u1")
            state = replace(previous_state, jit_mode=True, shape=shape, dtype=uint8)
            return state, (AllocationQuery(shape, uint8), AllocationQuery((largest * np.uint64(3),), uint8))

        def generate_code(self) -> Callable:
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_center_crop = _eval_kernel()
            bicubic = interpolation == "bicubic"
            index_mask = np.uint64(_INDEX_MASK)

            def decode(
                batch_indices: np.ndarray, my_storage: tuple, metadata: np.ndarray, storage_state: tuple
            ) -> np.ndarray:
                destination, temp_storage = my_storage
                for dst_ix in my_range(len(batch_indices)):
                    field = metadata[batch_indices[dst_ix] & index_mask]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:
                        image = temp_storage[dst_ix]
                        imdecode_c(image_data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                        image = image.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                    else:
                        image = image_data.reshape(height, width, 3)
                    resize_center_crop(image, destination[dst_ix], resize_short, bicubic)
                return destination[: len(batch_indices)]

            decode.is_parallel = True
            return decode

    return ResizeCenterCropRGBImageDecoder()


def _next_ffcv_batch(iterator: Any) -> Any | None:
    """The next batch of an FFCV epoch iterator, None at the end, an error if its reading thread died.

    FFCV 1.0.2 reads in a thread (the iterator itself) that just dies on an error in the pipeline, printing
    the traceback, while `next()` waits forever on its output queue; we only call `next()` once a batch (or the
    end marker) is queued.
    """
    while iterator.output_queue.empty():
        if not iterator.is_alive():
            raise RuntimeError("FFCV's reading thread stopped with an error; its traceback is printed above")
        time.sleep(0.001)
    return next(iterator, None)


def _stop_ffcv_iterator(iterator: Any) -> None:
    """End an FFCV epoch iterator: its reading thread first (waited for), then its memory context.

    FFCV 1.0.2's `close()` only sets a flag that the thread checks while its output queue stays full, and at the
    end of an epoch the thread blocks forever putting its end marker into a full queue. So we take away the
    batches it has not started (`iter_ixes`) and drain the queue until it returns: at most the batch in flight
    is decoded. Waiting keeps an abandoned epoch's thread from decoding with the next epoch's state, from
    running numba's parallel loops alongside the next epoch's thread, and from reading a closed memory context.
    """
    iterator.iter_ixes = iter(())
    while iterator.is_alive():
        try:
            iterator.output_queue.get_nowait()
        except queue.Empty:
            iterator.join(0.005)
    iterator.close()


class _FFCVShard(ShardLoader):
    def __init__(
        self,
        config: DataConfig,
        split: str,
        rank: int,
        world_size: int,
        epoch: int,
        device: torch.device,
    ) -> None:
        assert config.path is not None
        beton = config.path / f"{split}.beton"
        if not beton.is_file():
            raise FileNotFoundError(
                f"{beton} not found; write it with: python train/write_beton.py --data <image folder> "
                f"--out {config.path}"
            )
        super().__init__(config, split, read_class_names(beton), rank, world_size, epoch)
        _require_ffcv()
        from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

        size = (config.img_size, config.img_size)
        self._decoder: Any = None
        if self.train:
            self._decoder = _seeded_crop_decoder(size, (config.min_crop_scale, 1.0), config.seed, config.hflip)
        else:
            self._decoder = _eval_decoder(config.img_size, config.eval_resize, config.eval_interpolation)
        image_ops: list[Any] = [self._decoder]
        # (B, H, W, 3) uint8 numpy -> torch on the device -> (B, 3, H, W) view. FFCV's own NormalizeImage
        # needs cupy on GPU; normalize_on_device does the same in torch.
        image_ops += [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage()]
        # No Squeeze(): it squeezes a last batch of one to a 0-d tensor, which ToDevice then fails on.
        label_ops = [_label_decoder(), ToTensor(), ToDevice(device, non_blocking=True)]  # (B, 1) int64

        import numba
        from ffcv.loader import Loader

        # FFCV's workers are numba threads; numba refuses more than its NUMBA_NUM_THREADS (the node's cores).
        num_workers = min(config.num_workers, numba.config.NUMBA_NUM_THREADS)
        if num_workers < config.num_workers:
            warnings.warn(
                f"num_workers={config.num_workers}: this node runs at most {num_workers} FFCV threads; using "
                f"{num_workers}",
                stacklevel=3,
            )
        with _keep_torch_threads():
            self._loader = Loader(
                str(beton),
                batch_size=config.batch_size,
                num_workers=num_workers,
                os_cache=config.os_cache,
                order=_ffcv_order(self._shard),
                seed=config.seed,
                pipelines={"image": image_ops, "label": label_ops},
                drop_last=self.train,
                batches_ahead=config.batches_ahead,
            )
        _FFCV_LOADERS.append(self._loader)
        _schedule_plain_indices(self._loader)
        if not self.train:
            images = self._loader.reader.metadata["f0"]  # f0: the image field
            check_stored_resolution(beton, images["height"], images["width"], config.eval_resize)

    def _dataset_size(self) -> int:
        return int(self._loader.reader.num_samples)

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with _keep_torch_threads():
            threads = torch.get_num_threads()
            self._loader.next_epoch = epoch  # the epoch FFCV hands to our order's sample_order
            if self.train:
                self._decoder.set_epoch(epoch)  # before iter() starts the reading thread, which reads it
            iterator = iter(self._loader)
            try:
                while (batch := _next_ffcv_batch(iterator)) is not None:
                    images, labels = batch
                    # FFCV's reading thread set the thread count before it queued the first batch.
                    torch.set_num_threads(threads)
                    # FFCV's batches are views into a ring of batches_ahead + 2 buffers that it overwrites as
                    # it reads on; the copy (cheap next to decoding) makes them safe to keep, and contiguous.
                    yield images.clone(memory_format=torch.contiguous_format), labels.reshape(-1).clone()
            finally:
                _stop_ffcv_iterator(iterator)
