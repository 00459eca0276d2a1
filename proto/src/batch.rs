//! Batching what a stream has ready, within a count and a size: how tasks,
//! completions and object events travel several to a message without
//! waiting for a batch to fill.

use futures::{FutureExt as _, Stream, StreamExt as _};

/// About the most bytes one batched message carries (tasks, completions,
/// object events): far below the 4 MiB a gRPC client accepts by default.
/// A larger item goes alone.
pub const MAX_BYTES: usize = 1 << 20;

/// The items `stream` has ready each time the result is polled, as batches
/// of at most `max_items` items and about `max_bytes` bytes as `size`
/// counts them: an item that would take a batch over `max_bytes` starts
/// the next one, and an item larger than `max_bytes` goes alone. A batch
/// goes as soon as its first item is there; it never waits for more.
pub fn ready_batches<S, F>(
    stream: S,
    max_items: usize,
    max_bytes: usize,
    size: F,
) -> impl Stream<Item = Vec<S::Item>>
where
    S: Stream + Unpin,
    F: Fn(&S::Item) -> usize,
{
    let max_items = max_items.max(1);
    futures::stream::unfold(
        (stream.fuse(), None, size),
        move |(mut stream, carried, size)| async move {
            let first = match carried {
                Some(item) => item,
                None => stream.next().await?,
            };
            let mut bytes = size(&first);
            let mut batch = vec![first];
            while batch.len() < max_items {
                // Only what is there now; the stream's end shows at the next
                // batch.
                let Some(Some(item)) = stream.next().now_or_never() else {
                    break;
                };
                let n = size(&item);
                if bytes + n > max_bytes {
                    return Some((batch, (stream, Some(item), size)));
                }
                bytes += n;
                batch.push(item);
            }
            Some((batch, (stream, None, size)))
        },
    )
}

#[cfg(test)]
mod tests {
    use futures::{StreamExt as _, executor::block_on};

    use super::*;

    #[test]
    fn batches_keep_order_within_the_count_and_the_size() {
        let items = futures::stream::iter([1usize, 1, 1, 5, 1, 20, 1]);
        let batches: Vec<Vec<usize>> = block_on(ready_batches(items, 3, 6, |n| *n).collect());
        assert_eq!(
            batches,
            vec![
                vec![1, 1, 1], // the count
                vec![5, 1],    // the size, exactly
                vec![20],      // larger than the size: alone
                vec![1],
            ]
        );
    }

    #[test]
    fn a_batch_goes_with_what_is_ready_and_never_waits_for_more() {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut batches = Box::pin(ready_batches(rx, 100, 1 << 20, |_: &u32| 1));
        tx.unbounded_send(1).unwrap();
        tx.unbounded_send(2).unwrap();
        assert_eq!(block_on(batches.next()), Some(vec![1, 2]));
        // Nothing ready: no batch yet.
        assert!(batches.next().now_or_never().is_none());
        tx.unbounded_send(3).unwrap();
        assert_eq!(block_on(batches.next()), Some(vec![3]));
        drop(tx);
        assert_eq!(block_on(batches.next()), None);
    }
}
