//! The fixed catalog: server types, images and locations (a subset of Hetzner's, with Hetzner's
//! ids where a public source gives them).
//!
//! # Facts and their sources
//!
//! Image names are not unique (since the Arm64 launch, 2023-04-12):
//! - System images come once per architecture under the same name (`debian-12` x86 and arm, …).
//!   `GET /images?name=N` without `architecture` returns **all** of them: clients that demanded a
//!   single match broke on that ("more than one Image found for name debian-11",
//!   <https://github.com/hetznercloud/terraform-provider-hcloud/issues/666>; "getByName() on images
//!   now fails and reports that there are several architectures",
//!   <https://github.com/LKDevelopment/hetzner-cloud-php-sdk/issues/104>).
//! - The `architecture` query filter ("The response will only contain the resources with the
//!   specified cpu architecture") is in the spec [spec `GET /images`]; hcloud-go added it together
//!   with `GetByNameAndArchitecture`/`GetForArchitecture` and deprecated `GetByName`/`Get` (which
//!   take the first element of the unfiltered list) in "feat: add support for ARM APIs"
//!   (hcloud-go ce9859f, 2023-04-12, <https://github.com/hetznercloud/hcloud-go/pull/249>). Debian's
//!   hcloud-cli 1.30.3 (hcloud-go 1.35.3) predates that: `server create --image NAME` calls
//!   `Image().Get(NAME)` and uses the first match (cli v1.30.3 `internal/cmd/server/create.go`).
//! - Order without `sort`: the x86 image comes first — "getByName() … always returns the first
//!   value which is usually the x86 image"
//!   (<https://github.com/LKDevelopment/hetzner-cloud-php-sdk/issues/110>, 2023-12). x86 images
//!   also have the lower id (each arm image was created after its x86 twin: a pasted
//!   `hcloud image list` shows `114690387 debian-12 x86 … 09:00:02` and
//!   `114690389 debian-12 arm … 09:00:03`), so the default order by id that the simulator uses
//!   (API-NOTES §2, itself **UNVERIFIED** as Hetzner's documented default) gives x86 first. The
//!   unit test `first_match_by_name_is_x86` keeps the catalog that way.
//! - `POST /servers` with an image *name* picks the image of the server type's architecture
//!   ("The hetzner cloud-api will select the right one by architecture of the server", issue 666
//!   above; the spec's `image` is "ID or name of the Image the Server is created from").
//!
//! Ids (see each entry; **UNVERIFIED** ones are plausible, not observed):
//! - `ubuntu-22.04` x86 = 67794396: `hcloud image describe ubuntu-22.04` output in
//!   <https://github.com/ansible-collections/hetzner.hcloud/pull/215>.
//! - `debian-12` x86 = 114690387, arm = 114690389: Pulumi's `hcloud.getImage` example
//!   (<https://www.pulumi.com/docs/reference/pkg/hcloud/getimage>, id 114690387 with
//!   name `debian-12`) and the pasted `hcloud image list` above.
//! - `ubuntu-24.04` x86 = 161547269: `hcloud server create --image ubuntu-24.04` logs
//!   ("Waiting for create_server (… image: 161547269)") in public repositories; arm = 161547270
//!   from public configs that pair it with the x86 id (third-party, **UNVERIFIED** by Hetzner).
//! - Locations fsn1=1, nbg1=2: the spec's examples (`"id": 1, "name": "fsn1"`,
//!   `"id": 2, "name": "nbg1"`); hel1=3, ash=4, hil=5, sin=6 **UNVERIFIED**.
//! - Server type ids, prices and the remaining image ids (debian-13, fedora-42, rocky-9, alma-9):
//!   **UNVERIFIED**.

use crate::labels::Labels;
use crate::wire::{
    ImageOut, ImageProtection, LocationOut, Price, ServerTypeLocation, ServerTypeOut,
    ServerTypePrice,
};

pub(crate) struct Location {
    pub id: i64,
    pub name: &'static str,
    pub description: &'static str,
    pub country: &'static str,
    pub city: &'static str,
    pub latitude: f64,
    pub longitude: f64,
    pub network_zone: &'static str,
}

pub(crate) struct ServerType {
    pub id: i64,
    pub name: &'static str,
    pub cores: u32,
    pub memory: f64,
    pub disk: u32,
    pub cpu_type: &'static str,
    pub category: &'static str,
    pub architecture: &'static str,
    pub monthly_net: &'static str,
}

pub(crate) struct Image {
    pub id: i64,
    pub name: &'static str,
    pub description: &'static str,
    pub os_flavor: &'static str,
    pub os_version: &'static str,
    pub architecture: &'static str,
}

pub(crate) const LOCATIONS: &[Location] = &[
    Location {
        id: 1,
        name: "fsn1",
        description: "Falkenstein DC Park 1",
        country: "DE",
        city: "Falkenstein",
        latitude: 50.47612,
        longitude: 12.370071,
        network_zone: "eu-central",
    },
    Location {
        id: 2,
        name: "nbg1",
        description: "Nuremberg DC Park 1",
        country: "DE",
        city: "Nuremberg",
        latitude: 49.452102,
        longitude: 11.076665,
        network_zone: "eu-central",
    },
    Location {
        id: 3,
        name: "hel1",
        description: "Helsinki DC Park 1",
        country: "FI",
        city: "Helsinki",
        latitude: 60.169855,
        longitude: 24.938379,
        network_zone: "eu-central",
    },
    Location {
        id: 4,
        name: "ash",
        description: "Ashburn, VA",
        country: "US",
        city: "Ashburn, VA",
        latitude: 39.045821,
        longitude: -77.487073,
        network_zone: "us-east",
    },
    Location {
        id: 5,
        name: "hil",
        description: "Hillsboro, OR",
        country: "US",
        city: "Hillsboro, OR",
        latitude: 45.54222,
        longitude: -122.951924,
        network_zone: "us-west",
    },
    Location {
        id: 6,
        name: "sin",
        description: "Singapore",
        country: "SG",
        city: "Singapore",
        latitude: 1.283333,
        longitude: 103.833333,
        network_zone: "ap-southeast",
    },
];

pub(crate) const SERVER_TYPES: &[ServerType] = &[
    ServerType {
        id: 22,
        name: "cx22",
        cores: 2,
        memory: 4.0,
        disk: 40,
        cpu_type: "shared",
        category: "Cost-Optimized",
        architecture: "x86",
        monthly_net: "3.7900",
    },
    ServerType {
        id: 23,
        name: "cx23",
        cores: 2,
        memory: 4.0,
        disk: 40,
        cpu_type: "shared",
        category: "Cost-Optimized",
        architecture: "x86",
        monthly_net: "2.9900",
    },
    ServerType {
        id: 25,
        name: "cx32",
        cores: 4,
        memory: 8.0,
        disk: 80,
        cpu_type: "shared",
        category: "Cost-Optimized",
        architecture: "x86",
        monthly_net: "6.8000",
    },
    ServerType {
        id: 101,
        name: "cpx11",
        cores: 2,
        memory: 2.0,
        disk: 40,
        cpu_type: "shared",
        category: "Regular Purpose",
        architecture: "x86",
        monthly_net: "4.3500",
    },
    ServerType {
        id: 102,
        name: "cpx22",
        cores: 2,
        memory: 4.0,
        disk: 80,
        cpu_type: "shared",
        category: "Regular Purpose",
        architecture: "x86",
        monthly_net: "7.0500",
    },
    ServerType {
        id: 103,
        name: "cpx32",
        cores: 4,
        memory: 8.0,
        disk: 160,
        cpu_type: "shared",
        category: "Regular Purpose",
        architecture: "x86",
        monthly_net: "12.4900",
    },
    ServerType {
        id: 45,
        name: "cax11",
        cores: 2,
        memory: 4.0,
        disk: 40,
        cpu_type: "shared",
        category: "Cost-Optimized",
        architecture: "arm",
        monthly_net: "3.7900",
    },
    ServerType {
        id: 96,
        name: "ccx13",
        cores: 2,
        memory: 8.0,
        disk: 80,
        cpu_type: "dedicated",
        category: "General Purpose",
        architecture: "x86",
        monthly_net: "12.4900",
    },
];

/// System images; names repeat across architectures like at Hetzner (a name picks the image that
/// matches the server type's architecture).
pub(crate) const IMAGES: &[Image] = &[
    Image {
        id: 67794396,
        name: "ubuntu-22.04",
        description: "Ubuntu 22.04",
        os_flavor: "ubuntu",
        os_version: "22.04",
        architecture: "x86",
    },
    Image {
        id: 161547269,
        name: "ubuntu-24.04",
        description: "Ubuntu 24.04",
        os_flavor: "ubuntu",
        os_version: "24.04",
        architecture: "x86",
    },
    Image {
        id: 161547270,
        name: "ubuntu-24.04",
        description: "Ubuntu 24.04",
        os_flavor: "ubuntu",
        os_version: "24.04",
        architecture: "arm",
    },
    Image {
        id: 114690387,
        name: "debian-12",
        description: "Debian 12",
        os_flavor: "debian",
        os_version: "12",
        architecture: "x86",
    },
    Image {
        id: 114690389,
        name: "debian-12",
        description: "Debian 12",
        os_flavor: "debian",
        os_version: "12",
        architecture: "arm",
    },
    Image {
        id: 245380290,
        name: "debian-13",
        description: "Debian 13",
        os_flavor: "debian",
        os_version: "13",
        architecture: "x86",
    },
    Image {
        id: 229580283,
        name: "fedora-42",
        description: "Fedora 42",
        os_flavor: "fedora",
        os_version: "42",
        architecture: "x86",
    },
    Image {
        id: 76766499,
        name: "rocky-9",
        description: "Rocky Linux 9",
        os_flavor: "rocky",
        os_version: "9",
        architecture: "x86",
    },
    Image {
        id: 76766502,
        name: "alma-9",
        description: "AlmaLinux 9",
        os_flavor: "alma",
        os_version: "9",
        architecture: "x86",
    },
];

const CATALOG_CREATED: &str = "2024-01-01T00:00:00+00:00";

/// When the catalog's images were created (for `sort=created`).
pub(crate) fn catalog_created() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(CATALOG_CREATED)
        .map(|t| t.to_utc())
        .unwrap_or_default()
}

fn gross(net: &str) -> String {
    // 19 % VAT, four decimals like the API.
    let net: f64 = net.parse().unwrap_or(0.0);
    format!("{:.4}", net * 1.19)
}

impl ServerType {
    pub(crate) fn out(&self) -> ServerTypeOut {
        let hourly_net = self.monthly_net.parse::<f64>().unwrap_or(0.0) / 730.0;
        let hourly_net = format!("{hourly_net:.4}");
        ServerTypeOut {
            id: self.id,
            name: self.name.to_string(),
            description: self.name.to_uppercase(),
            cores: self.cores,
            memory: self.memory,
            disk: self.disk,
            deprecated: false,
            prices: LOCATIONS
                .iter()
                .map(|l| ServerTypePrice {
                    location: l.name.to_string(),
                    price_hourly: Price {
                        gross: gross(&hourly_net),
                        net: hourly_net.clone(),
                    },
                    price_monthly: Price {
                        net: self.monthly_net.to_string(),
                        gross: gross(self.monthly_net),
                    },
                    included_traffic: 21_990_232_555_520,
                    price_per_tb_traffic: Price {
                        net: "1.0000".to_string(),
                        gross: "1.1900".to_string(),
                    },
                })
                .collect(),
            storage_type: "local",
            cpu_type: self.cpu_type,
            category: self.category.to_string(),
            architecture: self.architecture,
            deprecation: None,
            locations: LOCATIONS
                .iter()
                .map(|l| ServerTypeLocation {
                    id: l.id,
                    name: l.name.to_string(),
                    deprecation: None,
                    available: true,
                    recommended: true,
                })
                .collect(),
        }
    }
}

impl Location {
    pub(crate) fn out(&self) -> LocationOut {
        LocationOut {
            id: self.id,
            name: self.name.to_string(),
            description: self.description.to_string(),
            country: self.country.to_string(),
            city: self.city.to_string(),
            latitude: self.latitude,
            longitude: self.longitude,
            network_zone: self.network_zone.to_string(),
        }
    }
}

impl Image {
    pub(crate) fn out(&self) -> ImageOut {
        ImageOut {
            id: self.id,
            kind: "system",
            status: "available",
            name: Some(self.name.to_string()),
            description: self.description.to_string(),
            image_size: None,
            disk_size: 5.0,
            created: CATALOG_CREATED.to_string(),
            created_from: None,
            bound_to: None,
            os_flavor: self.os_flavor.to_string(),
            os_version: Some(self.os_version.to_string()),
            rapid_deploy: true,
            protection: ImageProtection { delete: false },
            deprecated: None,
            deleted: None,
            labels: Labels::new(),
            architecture: self.architecture,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clients that take the first image of `GET /images?name=N` (hcloud-go's deprecated
    /// `Image.Get`, Debian's hcloud-cli 1.30) must get the x86 image, as against Hetzner: with the
    /// list ordered by id, every name's lowest id is its x86 image.
    #[test]
    fn first_match_by_name_is_x86() {
        for image in IMAGES {
            let first = IMAGES
                .iter()
                .filter(|i| i.name == image.name)
                .min_by_key(|i| i.id)
                .map(|i| i.architecture);
            assert_eq!(first, Some("x86"), "first {} by id", image.name);
        }
    }

    #[test]
    fn ids_are_unique() {
        let mut ids: Vec<i64> = IMAGES.iter().map(|i| i.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), IMAGES.len(), "image ids");
        let mut ids: Vec<i64> = SERVER_TYPES.iter().map(|t| t.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), SERVER_TYPES.len(), "server type ids");
    }
}
