//! Hand-off of loader batches to tch.
//!
//! * CPU: the batch's image buffer is wrapped as a tensor without copying (`from_blob`); the
//!   [`DeviceBatch`] owns the host batch, so the wrapped tensor stays valid as long as it does.
//! * CUDA: the buffer is staged in pinned (page-locked) memory from libtorch's caching host
//!   allocator and copied with `non_blocking = true`; [`Prefetcher`] keeps the next batch's copy
//!   in flight while the current one is used. The caching host allocator only recycles a pinned
//!   block once the copies that read it have completed, so no explicit synchronisation is needed.
//! * u8 batches are normalised on the device: `(x / 255 - mean) / std` in f32, the same
//!   operation order as torchvision's ToTensor + Normalize.

use droppos_shards::loader::{Batch, Images, LoaderError, IMAGENET_MEAN, IMAGENET_STD};
use tch::{Device, Kind, Tensor};

/// A batch on its way to (or on) the device.
pub struct DeviceBatch {
    /// `[B, 3, S, S]` u8 or f32 on `device` (on CPU a zero-copy view of `host`).
    images: Tensor,
    /// `[B]` int64.
    pub labels: Tensor,
    /// `[B, S, S]` u8 masks (dense datasets).
    pub masks: Option<Tensor>,
    /// `[B, (S/p)²]` int64 patch labels (dense datasets).
    pub patch_labels: Option<Tensor>,
    pub keys: Vec<String>,
    pub epoch: u64,
    /// Each sample's position in the whole epoch order (keys the masking noise).
    pub epoch_positions: Vec<u64>,
    /// Resume point after this batch (see `droppos_shards::loader::Batch::consumed`).
    pub consumed: u64,
    /// Undecodable samples the loader skipped while filling this batch (the loader logged each).
    pub skipped: u64,
    device: Device,
    /// Keeps the memory of CPU views alive. Declared last: dropped after the tensors.
    host: Option<Batch>,
}

impl std::fmt::Debug for DeviceBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBatch")
            .field("images", &self.images.size())
            .field("kind", &self.images.kind())
            .field("device", &self.device)
            .field("epoch", &self.epoch)
            .field("consumed", &self.consumed)
            .finish()
    }
}

fn shape(b: &Batch) -> [i64; 4] {
    let [n, c, h, w] = b.image_shape();
    [n as i64, c as i64, h as i64, w as i64]
}

/// A tensor viewing `data` without copying.
///
/// # Safety
/// The returned tensor must not be used after `data` is freed or moved.
unsafe fn view<T>(data: &[T], size: &[i64], kind: Kind) -> Tensor {
    let mut strides = vec![1i64; size.len()];
    for i in (0..size.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * size[i + 1];
    }
    Tensor::from_blob(
        data.as_ptr() as *const u8,
        size,
        &strides,
        kind,
        Device::Cpu,
    )
}

impl DeviceBatch {
    /// Moves a loader batch to `device`: zero-copy on CPU; pinned + non-blocking on CUDA.
    pub fn new(batch: Batch, device: Device) -> DeviceBatch {
        let shp = shape(&batch);
        let n = batch.len() as i64;
        let s = batch.size as i64;
        let labels = Tensor::from_slice(&batch.labels);
        let patch_labels = batch.patch_labels.as_ref().map(|p| {
            let g = if n > 0 { p.len() as i64 / n } else { 0 };
            Tensor::from_slice(p).view([n, g]).to_kind(Kind::Int64)
        });
        // SAFETY: the views below point into `batch`, which is moved into the DeviceBatch and
        // outlives the tensors (field order); on CUDA the views are copied before returning.
        let (images_cpu, masks_cpu) = unsafe {
            let images = match &batch.images {
                Images::U8(v) => view(v, &shp, Kind::Uint8),
                Images::F32(v) => view(v, &shp, Kind::Float),
            };
            let masks = batch
                .masks
                .as_ref()
                .map(|m| view(m, &[n, s, s], Kind::Uint8));
            (images, masks)
        };
        if device == Device::Cpu {
            return DeviceBatch {
                images: images_cpu,
                labels,
                masks: masks_cpu,
                patch_labels,
                keys: batch.keys.clone(),
                epoch: batch.epoch,
                epoch_positions: batch.epoch_positions.clone(),
                consumed: batch.consumed,
                skipped: batch.skipped.len() as u64,
                device,
                host: Some(batch),
            };
        }
        let to_dev = |t: &Tensor| {
            // pin_memory copies into a pinned block (the only host copy); the device copy is
            // then asynchronous with respect to the host.
            t.pin_memory(device)
                .to_device_(device, t.kind(), true, false)
        };
        let images = to_dev(&images_cpu);
        let masks = masks_cpu.as_ref().map(to_dev);
        let labels = to_dev(&labels);
        let patch_labels = patch_labels.as_ref().map(to_dev);
        drop(images_cpu);
        drop(masks_cpu);
        DeviceBatch {
            images,
            labels,
            masks,
            patch_labels,
            keys: batch.keys,
            epoch: batch.epoch,
            epoch_positions: batch.epoch_positions,
            consumed: batch.consumed,
            skipped: batch.skipped.len() as u64,
            device,
            host: None,
        }
    }

    /// The images as loaded (u8 or normalised f32), `[B, 3, S, S]`. On CPU this borrows the
    /// host buffer: do not keep a `shallow_clone` of it beyond the life of this batch.
    pub fn images(&self) -> &Tensor {
        &self.images
    }

    /// Model input: f32, ImageNet-normalised, on the device (normalised there for u8 batches).
    pub fn input(&self) -> Tensor {
        match self.images.kind() {
            Kind::Uint8 => normalize_u8(&self.images),
            _ => self.images.copy(),
        }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether the images are a zero-copy view of the loader's buffer.
    pub fn is_zero_copy(&self) -> bool {
        self.host.is_some()
    }
}

/// `(x / 255 - mean) / std` per channel for a u8 `[B, 3, H, W]` tensor, on its device.
pub fn normalize_u8(x: &Tensor) -> Tensor {
    let dev = x.device();
    let mean = Tensor::from_slice(&IMAGENET_MEAN)
        .view([1, 3, 1, 1])
        .to_device(dev);
    let std = Tensor::from_slice(&IMAGENET_STD)
        .view([1, 3, 1, 1])
        .to_device(dev);
    (x.to_kind(Kind::Float) / 255.0 - mean) / std
}

/// Wraps a batch iterator and keeps the next batch's transfer in flight.
pub struct Prefetcher<I> {
    inner: I,
    device: Device,
    next: Option<Result<DeviceBatch, LoaderError>>,
    started: bool,
}

impl<I: Iterator<Item = Result<Batch, LoaderError>>> Prefetcher<I> {
    pub fn new(inner: I, device: Device) -> Self {
        Prefetcher {
            inner,
            device,
            next: None,
            started: false,
        }
    }

    fn stage(&mut self) -> Option<Result<DeviceBatch, LoaderError>> {
        self.inner
            .next()
            .map(|r| r.map(|b| DeviceBatch::new(b, self.device)))
    }
}

impl<I: Iterator<Item = Result<Batch, LoaderError>>> Iterator for Prefetcher<I> {
    type Item = Result<DeviceBatch, LoaderError>;
    fn next(&mut self) -> Option<Self::Item> {
        if !self.started {
            self.started = true;
            self.next = self.stage();
        }
        let current = self.next.take()?;
        if current.is_ok() {
            // Issue the following batch's copy before handing this one out.
            self.next = self.stage();
        }
        Some(current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use droppos_shards::loader::Batch;

    fn batch(images: Images) -> Batch {
        Batch {
            images,
            size: 2,
            labels: vec![3, 4],
            keys: vec!["a".into(), "b".into()],
            masks: Some((0..8).collect()),
            patch_labels: None,
            epoch: 1,
            consumed: 2,
            positions: vec![0, 1],
            epoch_positions: vec![4, 5],
            geometry: vec![],
            skipped: vec![],
        }
    }

    #[test]
    fn cpu_hand_off_is_zero_copy_and_normalises_like_torchvision() {
        let px: Vec<u8> = (0..24).map(|v| (v * 10) as u8).collect();
        let host_ptr = px.as_ptr() as usize;
        let db = DeviceBatch::new(batch(Images::U8(px.clone())), Device::Cpu);
        assert!(db.is_zero_copy());
        assert_eq!(db.images().size(), vec![2, 3, 2, 2]);
        assert_eq!(db.images().kind(), Kind::Uint8);
        // The tensor's data pointer is the loader buffer's (moved, not copied, into the batch).
        assert_ne!(db.images().data_ptr() as usize, host_ptr); // px was cloned above
        let host = match &db.host.as_ref().unwrap().images {
            Images::U8(v) => v.as_ptr() as usize,
            _ => unreachable!(),
        };
        assert_eq!(db.images().data_ptr() as usize, host);
        let x = db.input();
        let v: Vec<f32> = Vec::<f32>::try_from(x.flatten(0, -1)).unwrap();
        for (i, &val) in v.iter().enumerate() {
            let c = (i / 4) % 3;
            let want = (px[i] as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            assert!((val - want).abs() < 1e-6, "{i}: {val} vs {want}");
        }
        assert_eq!(Vec::<i64>::try_from(&db.labels).unwrap(), vec![3, 4]);
        assert_eq!(db.masks.as_ref().unwrap().size(), vec![2, 2, 2]);
    }

    #[test]
    fn prefetcher_yields_in_order() {
        let items: Vec<Result<Batch, LoaderError>> = (0..3)
            .map(|i| {
                let mut b = batch(Images::F32(vec![i as f32; 24]));
                b.consumed = i;
                Ok(b)
            })
            .collect();
        let got: Vec<u64> = Prefetcher::new(items.into_iter(), Device::Cpu)
            .map(|b| b.unwrap().consumed)
            .collect();
        assert_eq!(got, vec![0, 1, 2]);
    }
}
