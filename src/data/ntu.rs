//! Raw NTU RGB+D .skeleton parser.
