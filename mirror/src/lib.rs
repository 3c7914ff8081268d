//! The service-mirror controller: keeps local mirrors of the Services that linked clusters
//! export. Filled in by the service-mirror issue.
