"""The radiologist's review of flagged studies: review runs that wait for a verdict in the
Prefect UI, the review.json records they write, and the labels and annotations made from them."""
