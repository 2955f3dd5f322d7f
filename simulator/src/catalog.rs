//! The fixed catalog: server types, images and locations (a plausible subset of Hetzner's).

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
        id: 103908070,
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
