"""The paper's Scan -> Localize -> Diagnose -> Treat -> Verify pipeline."""
