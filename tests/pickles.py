"""A pickle that runs code when loaded: proof, by a marker file, that a loader executed it."""

import pickle


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creating the marker file is the "code" that runs


def write_malicious_pickle(path, marker, protocol=pickle.DEFAULT_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": Payload(str(marker))}}, f, protocol=protocol)
