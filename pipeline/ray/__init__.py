"""Scale out on Ray: replay many recordings, serve many simulated cameras (optional extra ``ray``).

privcam does not schedule a cluster itself; it hands Ray two jobs and keeps the work in one place.
The per-batch work is :class:`~pipeline.stream.classifier.KeyedClassifier` (protected frames in,
predictions out), built by :func:`pipeline.stream.run.build_classifier` exactly as the local pipeline
builds it, here inside each Ray actor (:class:`KeyedBatchPredictor`).

Replay (:func:`replay_on_ray`)::

    recordings (paths, folders, globs) -> driver: header scan + fingerprint check per recording
    -> RecordingDatasource: one read task per recording, streaming blocks of whole batches
    -> map_batches(KeyedBatchPredictor) on a fixed actor pool -> driver: back in order -> sink

* A read task walks its recording through a read-only memory map with the same damage-tolerant
  walker as the local reader (:class:`RecordingReader`), so the frames and the damage
  report are the local ones; the file is never read into memory as a whole.
* One dataset row is one model batch: ``batch_size`` consecutive intact frames of one recording,
  cut exactly where the local replay cuts them (from the first frame, in file order). CPU kernels
  give results that differ in the last bits for batches of other sizes, so equal batches are what
  makes the Ray predictions equal the local ones bit for bit. A block holds whole rows (about
  ``block_bytes``), so Ray may move, merge or split blocks without changing any batch.
* Model, key and gather tables are built once per actor (per frame format) from the key file
  path and checkpoint path given to the actor constructor; tensors and key material never travel
  as task arguments or through the object store (only protected frames and predictions do).
* The driver puts predictions back into recording order and file order (a small reorder buffer of
  predictions only), so a JSON-lines output line is the local line with a leading ``recording``.
  A recording whose batch fails (e.g. a frame of another format) keeps the predictions before
  that batch, as the local replay does, and the summary names the error.

Live many-camera mode (:func:`run_cameras_on_ray`)::

    CameraActor x N (own sensor, frame counter, rotation; optional own recording)
      --ray.util.queue.Queue(queue_size) of ObjectRefs--> ModelWorker x M --Queue--> driver sink

Every queue is bounded, so a slow model pool blocks the cameras (backpressure across
processes) and memory stays flat. Camera ``i`` captures a contiguous shard of the source whose
size is a multiple of ``batch_size`` and numbers its frames with the source item index, so every
frame index (and per-frame rotation) is unique across cameras and the batches are the local
run's: the union of the camera predictions equals ``privcam run`` bit for bit.

Keys: every worker reads the key file path it is given (on a cluster that path must exist on
every node, like the checkpoint and the recordings). :class:`sensor.keys.Key` refuses to be
pickled, so the secret cannot reach the object store or a task argument by accident; only the
16-hex-digit fingerprint appears in results and messages.
"""
